"""Few-shot episodes and 1% splits: sizes, disjointness, determinism, clear errors."""
from collections import Counter

import fixtures_data as fx
import pytest

from cgc_ray.data import ImageRecord, episode, percent_split, records


def _recs(per_class):
    return [ImageRecord(f"/d/c{c}/img{k:03d}.jpg", c) for c, n in enumerate(per_class) for k in range(n)]


def test_episode_sizes_disjoint_and_complete():
    recs = _recs([12, 7, 6])
    train, val = episode(recs, shots=5, seed=3)
    assert Counter(r.label for r in train) == {0: 5, 1: 5, 2: 5}
    assert Counter(r.label for r in val) == {0: 7, 1: 2, 2: 1}
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(recs)


def test_episode_is_seeded_and_ignores_input_order():
    recs = _recs([20, 20])
    a, _ = episode(recs, 1, seed=0)
    b, _ = episode(list(reversed(recs)), 1, seed=0)
    assert sorted(r.path for r in a) == sorted(r.path for r in b)
    picks = {tuple(r.path for r in episode(recs, 1, seed=s)[0]) for s in range(10)}
    assert len(picks) > 1


def test_episode_too_few_images_names_the_class():
    with pytest.raises(ValueError, match="class 1 has 5 images but a 5-shot episode needs at least 6"):
        episode(_recs([9, 5]), 5, seed=0)


def test_percent_split_per_class_at_least_one():
    recs = _recs([300, 40, 3])
    lab, unlab = percent_split(recs, 1, seed=0)
    assert Counter(r.label for r in lab) == {0: 3, 1: 1, 2: 1}
    assert len(lab) + len(unlab) == len(recs) and set(lab).isdisjoint(unlab)
    assert percent_split(recs, 1, seed=0)[0] == lab
    with pytest.raises(ValueError, match="percent must be in"):
        percent_split(recs, 0, seed=0)


def test_percent_split_from_list_file(tmp_path):
    recs = _recs([5, 5])
    lst = tmp_path / "1percent.txt"
    lst.write_text("c0/img003.jpg\nc1/img004.jpg\n\n")
    lab, unlab = percent_split(recs, 1, seed=0, list_file=lst)
    assert [r.path for r in lab] == ["/d/c0/img003.jpg", "/d/c1/img004.jpg"]
    assert len(unlab) == 8 and set(lab).isdisjoint(unlab)
    lst.write_text("img003.jpg\n")
    with pytest.raises(ValueError, match="match several images"):
        percent_split(recs, 1, seed=0, list_file=lst)
    lst.write_text("c0/img003.jpg\nc2/img000.jpg\n")
    with pytest.raises(ValueError, match=r"1 of 2 images listed .* e.g. \['c2/img000.jpg'\]"):
        percent_split(recs, 1, seed=0, list_file=lst)
    with pytest.raises(FileNotFoundError, match="other.txt"):
        percent_split(recs, 1, seed=0, list_file=tmp_path / "other.txt")


def test_few_shot_episode_on_a_parsed_dataset(tmp_path):
    fx.write_aircraft(tmp_path)
    with pytest.raises(ValueError, match="class 0 has 1 images"):
        episode(records("aircraft", tmp_path, "trainval"), 1, seed=0)
    train, val = episode(records("aircraft", tmp_path, "test") + records("aircraft", tmp_path, "train"), 1, seed=0)
    assert Counter(r.label for r in train) == {0: 1, 2: 1} and len(val) == 2
