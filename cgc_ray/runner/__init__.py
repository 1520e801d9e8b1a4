"""The only code that imports Ray: the sweep driver (``driver``), what runs inside a trial (``worker``), the
cluster it attaches to (``cluster``), resource checks (``resources``), claims on trials (``leases``) and the
live view (``progress``), trackers and Tune's files (``tracking``)."""
