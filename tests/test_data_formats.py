"""Each dataset parser on a tiny fixture in its exact on-disk layout: counts, labels, splits, boxes to the pixel."""
import os

import fixtures_data as fx
import pytest

import cgc_ray.data.imagenet as imagenet
from cgc_ray.data import DatasetFormatError, ImageRecord, class_names, records


def _by_name(recs):
    return {os.path.basename(r.path): r for r in recs}


def test_cub_splits_labels_and_xywh_boxes(tmp_path):
    d = fx.write_cub(tmp_path)
    train = records("cub200", tmp_path, "train")
    test = records("cub200", d, "test")  # the dataset folder itself works too
    assert [r.label for r in train] == [0, 1, 2] and [r.label for r in test] == [0, 1, 2]
    assert train[0] == ImageRecord(str(d / "images/001.Black_footed_Albatross/Black_footed_Albatross_0001_1.jpg"),
                                   0, ((0.0, 1.0, 4.0, 3.0),))
    assert test[0].boxes == ((1.5, 2.5, 4.5, 6.0),)  # x, y, x + w, y + h
    assert train[2].boxes == ((3.0, 1.0, 5.0, 3.0),)
    assert all(os.path.isfile(r.path) for r in train + test)
    assert class_names("cub200", tmp_path) == ["001.Black_footed_Albatross", "002.Laysan_Albatross",
                                               "003.Sooty_Albatross"]


def test_synthetic_routes_through_ensure_and_conflict_split(tmp_path, monkeypatch):
    import cgc_ray.data.synthetic as synthetic

    d = fx.write_cub(tmp_path / "cache", conflict_ids=(2, 6))
    calls = []
    monkeypatch.setattr(synthetic, "ensure", lambda root, **kw: calls.append((root, kw)) or d)
    test = records("synthetic", tmp_path, "test", variant="spurious")
    conflict = records("synthetic", tmp_path, "conflict", variant="spurious")
    assert calls[0] == (tmp_path, {"variant": "spurious"})
    assert [r.label for r in test] == [1] and [r.label for r in conflict] == [0, 2]
    assert len(records("synthetic", tmp_path, "train")) == 3
    with pytest.raises(ValueError, match="only 'synthetic'"):
        records("cub200", d, "train", variant="spurious")


def test_cars_mat_annotations_one_based_inclusive(tmp_path):
    d = fx.write_cars(tmp_path)
    train = records("cars196", tmp_path, "train")
    test = records("cars196", d, "test")
    assert [r.label for r in train] == [0, 1, 1] and [r.label for r in test] == [2, 0]
    assert train[0].path == str(d / "cars_train" / "00001.jpg")
    assert train[0].boxes == ((0.0, 1.0, 8.0, 6.0),)  # (1, 2, 8, 6) 1-based inclusive
    assert train[2].boxes == ((1.0, 1.0, 2.0, 2.0),)  # a one-pixel box keeps one pixel of area
    assert test[0].boxes == ((3.0, 2.0, 7.0, 5.0),)
    assert class_names("cars196", tmp_path)[2] == "Acura TL Sedan 2012"


def test_aircraft_variant_order_and_boxes(tmp_path):
    d = fx.write_aircraft(tmp_path)
    split = {s: records("aircraft", tmp_path, s) for s in ("train", "val", "test", "trainval")}
    assert [r.label for r in split["train"]] == [0, 2]  # variants.txt order, not alphabetical
    assert [r.label for r in split["val"]] == [1]
    assert [r.label for r in split["test"]] == [2, 0]
    assert len(split["trainval"]) == 3
    assert split["train"][0].path == str(d / "data" / "images" / "0000001.jpg")
    assert split["val"][0].boxes == ((4.0, 1.0, 7.0, 3.0),)
    assert split["test"][1].boxes == ((7.0, 5.0, 8.0, 6.0),)
    assert class_names("aircraft", d) == fx.AIRCRAFT_VARIANTS


def test_flowers_mat_splits(tmp_path):
    d = fx.write_flowers(tmp_path)
    train = records("flowers102", tmp_path, "train")
    assert [os.path.basename(r.path) for r in train] == ["image_00002.jpg", "image_00005.jpg", "image_00004.jpg"]
    assert [r.label for r in train] == [0, 2, 1]
    assert [r.label for r in records("flowers102", d, "test")] == [0, 1, 0]  # ids 7, 6, 3
    assert len(records("flowers102", d, "trainval")) == 4
    assert all(r.boxes == () for r in train)
    assert len(class_names("flowers102", d)) == 102


@pytest.mark.parametrize("val_layout,boxes", [("flat", "xml"), ("per_class", "xml"), ("flat", "csv")])
def test_imagenet_val_layouts_and_voc_boxes(tmp_path, val_layout, boxes):
    fx.write_imagenet(tmp_path, val_layout=val_layout, boxes=boxes)
    val = _by_name(records("imagenet", tmp_path, "val", cache_dir=tmp_path / "cache"))
    assert len(val) == 3
    v1 = val["ILSVRC2012_val_00000001.JPEG"]
    assert v1.label == 1
    assert v1.boxes == ((0.0, 0.0, 4.0, 3.0), (4.0, 1.0, 8.0, 6.0))  # other-class box dropped
    assert val["ILSVRC2012_val_00000003.JPEG"].boxes == ((2.0, 0.0, 3.0, 1.0),)
    assert v1.size == ((8, 6) if boxes == "xml" else None)
    train = records("imagenet", tmp_path, "train", cache_dir=tmp_path / "cache")
    assert [r.label for r in train] == [0, 0, 1, 1, 2, 2]
    if boxes == "xml":
        assert _by_name(train)["n01440764_10026.JPEG"].boxes == ((1.0, 2.0, 6.0, 5.0),)


def test_imagenet_one_percent_split(tmp_path):
    fx.write_imagenet(tmp_path)
    sub = records("imagenet", tmp_path, "train_1pct", cache_dir=tmp_path / "cache")
    assert sorted(_by_name(sub)) == ["n01440764_10026.JPEG", "n01484850_2.JPEG"]
    assert [r.label for r in sub] == [0, 2]


def test_imagenet_index_cache_skips_walk_and_sees_new_files(tmp_path, monkeypatch):
    d = fx.write_imagenet(tmp_path)
    first = records("imagenet", tmp_path, "val", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("imagenet-val-*.parquet"))) == 1

    def no_walk(*a, **k):
        raise AssertionError("walked the folder although the index was cached")

    real_walk = imagenet._walk_imagenet
    monkeypatch.setattr(imagenet, "_walk_imagenet", no_walk)
    assert records("imagenet", tmp_path, "val", cache_dir=tmp_path / "cache") == first
    fx.write_image(d / "train" / "n01443537" / "n01443537_3.JPEG")
    st = os.stat(d / "train" / "n01443537")
    os.utime(d / "train" / "n01443537", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    monkeypatch.setattr(imagenet, "_walk_imagenet", real_walk)
    assert len(records("imagenet", tmp_path, "train", cache_dir=tmp_path / "cache")) == 7
    monkeypatch.setattr(imagenet, "_walk_imagenet", no_walk)
    assert len(records("imagenet", tmp_path, "train", cache_dir=tmp_path / "cache")) == 7


def test_imagenet100_keeps_the_cmc_classes_in_sorted_order(tmp_path):
    extra = "n15075141"  # toilet tissue: not among the 100
    fx.write_imagenet(tmp_path, wnids=list(imagenet.IMAGENET100_WNIDS) + [extra])
    train = records("imagenet100", tmp_path, "train", cache_dir=tmp_path / "cache")
    assert len(train) == 200
    order = sorted(imagenet.IMAGENET100_WNIDS)
    assert all(os.path.basename(os.path.dirname(r.path)) == order[r.label] for r in train)
    assert class_names("imagenet100", tmp_path) == order


def test_imagenet100_names_absent_classes(tmp_path):
    fx.write_imagenet(tmp_path)
    with pytest.raises(DatasetFormatError, match="100 ImageNet-100 classes are absent"):
        records("imagenet100", tmp_path, "train", cache_dir=tmp_path / "cache")


def test_unrel_groups_boxes_per_image_and_class(tmp_path):
    fx.write_unrel(tmp_path)
    recs = records("unrel", tmp_path, "test")
    got = {(os.path.basename(r.path), r.label): r.boxes for r in recs}
    assert got == {("img1.jpg", 817): ((0.0, 0.0, 4.0, 4.0), (4.0, 1.0, 8.0, 6.0)),
                   ("img1.jpg", 207): ((1.0, 1.0, 3.0, 3.0),),
                   ("img2.jpg", 779): ((2.0, 2.0, 6.0, 5.0),)}
    assert class_names("unrel", tmp_path) == ["dog", "bus", "car"]


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetFormatError) as e:
        records("cub200", tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "images.txt" in msg and "bounding_boxes.txt" in msg
    fx.write_cars(tmp_path)
    (tmp_path / "stanford_cars" / "devkit" / "cars_train_annos.mat").unlink()
    with pytest.raises(DatasetFormatError, match="missing annotation file .*cars_train_annos.mat"):
        records("cars196", tmp_path, "train")


def test_malformed_files_name_path_and_line(tmp_path):
    d = fx.write_cub(tmp_path)
    (d / "bounding_boxes.txt").write_text("1 0.0 1.0\n")
    with pytest.raises(DatasetFormatError, match=r"bounding_boxes.txt line 1: expected 5 fields"):
        records("cub200", d, "train")
    im = fx.write_imagenet(tmp_path / "inet")
    (im / "bbox" / "val" / "ILSVRC2012_val_00000002.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetFormatError, match="ILSVRC2012_val_00000002.xml"):
        records("imagenet", im, "val", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        records("cub200", d, "val")


def test_flat_val_without_labels_is_an_error(tmp_path):
    d = fx.write_imagenet(tmp_path)
    (d / "bbox" / "val" / "ILSVRC2012_val_00000003.xml").unlink()
    with pytest.raises(DatasetFormatError, match="ILSVRC2012_val_00000003.JPEG lies in a flat val/ folder"):
        records("imagenet", d, "val", cache_dir=tmp_path / "cache")


def test_imagenet_val_only_needs_a_class_list(tmp_path):
    import shutil

    d = fx.write_imagenet(tmp_path)
    shutil.rmtree(d / "train")
    with pytest.raises(DatasetFormatError, match="LOC_synset_mapping.txt"):
        records("imagenet", d, "val", cache_dir=tmp_path / "cache")
    (d / "LOC_synset_mapping.txt").write_text("".join(f"{w} fish {k}\n" for k, w in enumerate(fx.IMAGENET_WNIDS)))
    val = _by_name(records("imagenet", d, "val", cache_dir=tmp_path / "cache"))
    assert val["ILSVRC2012_val_00000001.JPEG"].label == 1
    assert class_names("imagenet", d) == ["fish 0", "fish 1", "fish 2"]


def test_imagenet_kaggle_tree(tmp_path):
    import shutil

    src = fx.write_imagenet(tmp_path / "src")
    kaggle = tmp_path / "imagenet-object-localization-challenge"
    data = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    data.mkdir(parents=True)
    for split in ("train", "val"):
        shutil.move(src / split, data / split)
    (kaggle / "ILSVRC" / "Annotations").mkdir()
    shutil.move(src / "bbox", kaggle / "ILSVRC" / "Annotations" / "CLS-LOC")  # -> CLS-LOC/{train,val}/
    val = _by_name(records("imagenet", kaggle, "val", cache_dir=tmp_path / "cache"))
    assert val["ILSVRC2012_val_00000002.JPEG"].boxes == ((1.0, 1.0, 7.0, 5.0),)
    assert val["ILSVRC2012_val_00000002.JPEG"].label == 0
