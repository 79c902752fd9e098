"""The dataset readers on tiny fake trees written in each dataset's on-disk format."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scripts_loader import load_script

from xbm.data.datasets.base import DatasetFormatError, contiguous_labels
from xbm.data.datasets.cars196 import Cars196
from xbm.data.datasets.cub200 import CUB200
from xbm.data.datasets.deepfashion2 import DeepFashion2, build_index, read_index
from xbm.data.datasets.inshop import InShop
from xbm.data.datasets.list_dataset import ListDataset
from xbm.data.datasets.sop import SOP
from xbm.data.datasets.vehicleid import VehicleID


def write_image(path: Path, color=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG", quality=95)
    return path


def write_text(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -- SOP ------------------------------------------------------------------------------------------
def make_sop(root: Path) -> None:
    header = "image_id class_id super_class_id path"
    train = [(1, 5, 1, "bicycle_final/a_0.JPG"), (2, 5, 1, "bicycle_final/a_1.JPG"),
             (3, 2, 2, "chair_final/b_0.JPG"), (4, 9, 2, "chair_final/c_0.JPG"), (5, 9, 2, "chair_final/c_1.JPG")]
    test = [(1, 20, 1, "bicycle_final/d_0.JPG"), (2, 20, 1, "bicycle_final/d_1.JPG"), (3, 30, 3, "mug_final/e_0.JPG")]
    for name, rows in (("train", train), ("test", test)):
        write_text(root / f"Ebay_{name}.txt", [header] + [" ".join(map(str, r)) for r in rows])
        for row in rows:
            write_image(root / row[3])


def test_sop_counts_and_contiguous_labels(tmp_path):
    make_sop(tmp_path)
    train = SOP(tmp_path, "train")
    assert len(train) == 5
    # class ids 5, 2, 9 -> ranks 1, 0, 2
    assert train.labels.tolist() == [1, 1, 0, 2, 2]
    assert train.labels.dtype == np.int64
    assert str(train.paths[2]) == "chair_final/b_0.JPG"
    image, label = train[3]
    assert image.mode == "RGB" and image.size == (40, 30) and label == 2
    test = SOP(tmp_path, "test")
    assert test.labels.tolist() == [0, 0, 1]
    assert SOP.EVAL_TASKS == {"test": ("test", None)} and SOP.RECALL_KS == (1, 10, 100, 1000)


def test_transform_is_applied(tmp_path):
    make_sop(tmp_path)
    ds = SOP(tmp_path, "train", transform=lambda im: im.size)
    assert ds[0] == ((40, 30), 1)


def test_missing_root_names_folder_and_download_page(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        SOP(tmp_path / "nowhere", "train")
    assert "nowhere" in str(err.value) and SOP.DOWNLOAD_URL in str(err.value)


def test_missing_list_file_names_file_and_download_page(tmp_path):
    make_sop(tmp_path)
    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        SOP(tmp_path, "test")
    assert "Ebay_test.txt" in str(err.value) and SOP.DOWNLOAD_URL in str(err.value)


def test_unknown_split_refused(tmp_path):
    make_sop(tmp_path)
    with pytest.raises(ValueError, match="query"):
        SOP(tmp_path, "query")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("6 5 1", "line 3: expected 4 fields"),
        ("6 five 1 bicycle_final/a_0.JPG", "line 3: class_id 'five' is not an integer"),
        ("6 5 1 ../outside.JPG", "line 3: image path '../outside.JPG'"),
        ("6 5 1 /etc/passwd", "line 3: image path '/etc/passwd'"),
        ("6 5 1 bicycle_final/../../x.JPG", "line 3"),
    ],
)
def test_sop_bad_lines_name_file_and_line(tmp_path, bad_line, message):
    make_sop(tmp_path)
    write_text(tmp_path / "Ebay_train.txt",
               ["image_id class_id super_class_id path", "1 5 1 bicycle_final/a_0.JPG", bad_line])
    with pytest.raises(DatasetFormatError) as err:
        SOP(tmp_path, "train")
    assert "Ebay_train.txt" in str(err.value) and message in str(err.value)


def test_sop_missing_header_and_empty_split(tmp_path):
    make_sop(tmp_path)
    write_text(tmp_path / "Ebay_train.txt", ["1 5 1 bicycle_final/a_0.JPG"])
    with pytest.raises(DatasetFormatError, match="line 1: expected the header"):
        SOP(tmp_path, "train")
    write_text(tmp_path / "Ebay_train.txt", ["image_id class_id super_class_id path"])
    with pytest.raises(ValueError, match="'train' .* has no images"):
        SOP(tmp_path, "train")


def test_missing_image_folder_fails_at_construction(tmp_path):
    make_sop(tmp_path)
    (tmp_path / "mug_final" / "e_0.JPG").unlink()
    with pytest.raises(FileNotFoundError, match="e_0.JPG"):
        SOP(tmp_path, "test")


# -- undecodable images ---------------------------------------------------------------------------
def corrupt(path: Path) -> None:
    path.write_bytes(b"this is not an image")


def test_undecodable_image_error_names_path(tmp_path):
    make_sop(tmp_path)
    corrupt(tmp_path / "bicycle_final/a_1.JPG")
    ds = SOP(tmp_path, "train")
    with pytest.raises(OSError, match="a_1.JPG"):
        ds[1]


def test_undecodable_image_skip_substitutes_same_class_and_counts(tmp_path, caplog):
    make_sop(tmp_path)
    write_image(tmp_path / "bicycle_final/a_0.JPG", color=(0, 0, 250))
    corrupt(tmp_path / "bicycle_final/a_1.JPG")
    ds = SOP(tmp_path, "train", bad_images="skip")
    with caplog.at_level(logging.WARNING):
        image, label = ds[1]
    assert label == 1  # the label of the requested item, from an image of the same class
    assert np.asarray(image)[5, 5, 2] > 200  # the blue a_0.JPG was substituted
    assert ds.bad_image_count == 1 and "a_1.JPG" in caplog.text
    ds[1]
    assert ds.bad_image_count == 1  # a known bad file is not decoded (or counted) again


def test_undecodable_whole_class_raises_in_skip_mode(tmp_path):
    make_sop(tmp_path)
    corrupt(tmp_path / "chair_final/b_0.JPG")
    ds = SOP(tmp_path, "train", bad_images="skip")
    with pytest.raises(OSError, match="every image of class 0"):
        ds[2]


def test_bad_images_policy_checked(tmp_path):
    make_sop(tmp_path)
    with pytest.raises(ValueError, match="bad_images"):
        SOP(tmp_path, "train", bad_images="ignore")


# -- In-Shop --------------------------------------------------------------------------------------
INSHOP_ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train"),
    ("img/WOMEN/Skirts/id_00000007/01_1_front.jpg", "id_00000007", "query"),
    ("img/WOMEN/Skirts/id_00000009/01_1_front.jpg", "id_00000009", "query"),
    ("img/WOMEN/Skirts/id_00000007/01_2_side.jpg", "id_00000007", "gallery"),
    ("img/WOMEN/Skirts/id_00000009/01_2_side.jpg", "id_00000009", "gallery"),
    ("img/WOMEN/Skirts/id_00000005/01_2_side.jpg", "id_00000005", "gallery"),
]


def make_inshop(root: Path, rows=INSHOP_ROWS, image_base=None, count=None) -> Path:
    lines = [str(len(rows) if count is None else count), "image_name item_id evaluation_status"]
    lines += [" ".join(r) for r in rows]
    write_text(root / "Eval" / "list_eval_partition.txt", lines)
    for path, _, _ in rows:
        write_image((image_base or root) / path)
    return root / "Eval" / "list_eval_partition.txt"


def test_inshop_splits_and_shared_query_gallery_labels(tmp_path):
    make_inshop(tmp_path)
    train, query, gallery = (InShop(tmp_path, s) for s in ("train", "query", "gallery"))
    assert (len(train), len(query), len(gallery)) == (3, 2, 3)
    assert train.labels.tolist() == [0, 0, 1]
    # one mapping over query + gallery: id_00000005 -> 0, id_00000007 -> 1, id_00000009 -> 2
    assert query.labels.tolist() == [1, 2]
    assert gallery.labels.tolist() == [1, 2, 0]
    assert set(str(p) for p in query.paths) == {r[0] for r in INSHOP_ROWS if r[2] == "query"}
    assert InShop.EVAL_TASKS == {"test": ("query", "gallery")}


def test_inshop_accepts_img_inside_Img(tmp_path):
    make_inshop(tmp_path, image_base=tmp_path / "Img")
    ds = InShop(tmp_path, "gallery")
    assert ds.image_root == tmp_path / "Img"
    assert ds[0][0].size == (40, 30)


def test_inshop_count_mismatch_and_bad_status(tmp_path):
    list_file = make_inshop(tmp_path, count=9)
    with pytest.raises(DatasetFormatError, match="announces 9 images but 8"):
        InShop(tmp_path, "train")
    rows = INSHOP_ROWS[:2] + [("img/x.jpg", "id_1", "val")]
    make_inshop(tmp_path, rows=rows)
    with pytest.raises(DatasetFormatError, match=r"line 5: evaluation_status 'val'"):
        InShop(tmp_path, "train")
    assert list_file.name == "list_eval_partition.txt"


# -- CUB-200-2011 ---------------------------------------------------------------------------------
def make_cub(root: Path) -> None:
    images = [(1, "001.Black_footed_Albatross/A_0001.jpg", 1), (2, "001.Black_footed_Albatross/A_0002.jpg", 1),
              (3, "100.Brown_Pelican/P_0001.jpg", 100), (4, "101.White_Pelican/W_0001.jpg", 101),
              (5, "200.Common_Yellowthroat/Y_0001.jpg", 200), (6, "200.Common_Yellowthroat/Y_0002.jpg", 200)]
    write_text(root / "images.txt", [f"{i} {p}" for i, p, _ in images])
    write_text(root / "image_class_labels.txt", [f"{i} {c}" for i, _, c in images])
    for _, path, _ in images:
        write_image(root / "images" / path)


def test_cub_class_split(tmp_path):
    make_cub(tmp_path)
    train, test = CUB200(tmp_path, "train"), CUB200(tmp_path, "test")
    assert train.labels.tolist() == [0, 0, 1] and test.labels.tolist() == [0, 1, 1]
    assert str(test.paths[0]) == "101.White_Pelican/W_0001.jpg"
    assert test.full_path(0) == tmp_path / "images" / "101.White_Pelican" / "W_0001.jpg"


def test_cub_unknown_image_id(tmp_path):
    make_cub(tmp_path)
    with open(tmp_path / "image_class_labels.txt", "a") as handle:
        handle.write("77 3\n")
    with pytest.raises(DatasetFormatError, match="line 7: image_id 77 is not in"):
        CUB200(tmp_path, "train")


# -- Cars196 --------------------------------------------------------------------------------------
def make_cars(root: Path, classes=(1, 1, 98, 99, 196, 196), tests=(0, 1, 0, 1, 0, 1)) -> None:
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.zeros((1, len(classes)), dtype=[(f, "O") for f in fields])
    for i, (cls, flag) in enumerate(zip(classes, tests)):
        path = f"car_ims/{i + 1:06d}.jpg"
        write_image(root / path)
        values = [path, np.uint8(5), np.uint8(6), np.uint16(300), np.uint16(200), np.uint8(cls), np.uint8(flag)]
        for field, value in zip(fields, values):
            annotations[0, i][field] = np.array([[value]]) if field != "relative_im_path" else np.array([value])
    class_names = np.array([[np.array([f"Car {i}"]) for i in range(1, 197)]], dtype=object)
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})


def test_cars_class_split_ignores_test_flag(tmp_path):
    make_cars(tmp_path)
    train, test = Cars196(tmp_path, "train"), Cars196(tmp_path, "test")
    assert [str(p) for p in train.paths] == ["car_ims/000001.jpg", "car_ims/000002.jpg", "car_ims/000003.jpg"]
    assert train.labels.tolist() == [0, 0, 1] and test.labels.tolist() == [0, 1, 1]
    assert test[2][0].size == (40, 30)  # whole image, no bounding-box crop


def test_cars_bad_mat_file(tmp_path):
    make_cars(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match="cars_annos.mat"):
        Cars196(tmp_path, "train")


# (classification split, file name, class) of the devkit layout: classes 1, 98 (train classes) and
# 99, 196 (test classes) occur in both of the devkit's files
CARS_DEVKIT = [("train", "00001.jpg", 1), ("train", "00002.jpg", 99), ("train", "00003.jpg", 196),
               ("train", "00004.jpg", 98), ("test", "00001.jpg", 98), ("test", "00002.jpg", 1),
               ("test", "00003.jpg", 196), ("test", "00004.jpg", 150)]


def devkit_annotations(rows, with_class=True) -> np.ndarray:
    """An `annotations` struct array with the devkit's fields, in the devkit's field order."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    if not with_class:  # devkit/cars_test_annos.mat: the same without the class
        fields.remove("class")
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (name, cls) in enumerate(rows):
        values = {"bbox_x1": np.uint8(5), "bbox_y1": np.uint8(6), "bbox_x2": np.uint16(300),
                  "bbox_y2": np.uint16(200), "class": np.uint8(cls), "fname": name}
        for field in fields:
            value = values[field]
            annotations[0, i][field] = np.array([value]) if field == "fname" else np.array([[value]])
    return annotations


def make_cars_devkit(root: Path, test_file="devkit/cars_test_annos_withlabels.mat", nested=False) -> None:
    from scipy.io import savemat

    for part in ("train", "test"):
        rows = [(name, cls) for split, name, cls in CARS_DEVKIT if split == part]
        folder = root / f"cars_{part}" / (f"cars_{part}" if nested else "")
        for name, _ in rows:
            write_image(folder / name)
        target = root / ("devkit/cars_train_annos.mat" if part == "train" else test_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        savemat(target, {"annotations": devkit_annotations(rows)})
    unlabelled = devkit_annotations([(name, 0) for split, name, _ in CARS_DEVKIT if split == "test"], False)
    savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": unlabelled})
    class_names = np.array([[np.array([f"Car {i}"]) for i in range(1, 197)]], dtype=object)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": class_names})


def test_cars_devkit_layout_split_by_class_over_both_files(tmp_path):
    make_cars_devkit(tmp_path)
    train, test = Cars196(tmp_path, "train"), Cars196(tmp_path, "test")
    assert train.layout() == "devkit"
    assert [str(p) for p in train.paths] == ["cars_train/00001.jpg", "cars_train/00004.jpg",
                                            "cars_test/00001.jpg", "cars_test/00002.jpg"]
    assert train.labels.tolist() == [0, 1, 1, 0]  # classes 1, 98, 98, 1
    assert [str(p) for p in test.paths] == ["cars_train/00002.jpg", "cars_train/00003.jpg",
                                           "cars_test/00003.jpg", "cars_test/00004.jpg"]
    assert test.labels.tolist() == [0, 2, 2, 1]  # classes 99, 196, 196, 150
    assert test[3][0].size == (40, 30)  # whole image, no bounding-box crop


def test_cars_both_layouts_give_the_same_classes(tmp_path):
    make_cars_devkit(tmp_path / "devkit_layout")
    classes = [cls for _, _, cls in CARS_DEVKIT]
    make_cars(tmp_path / "all_in_one", classes=classes, tests=[int(s == "test") for s, _, _ in CARS_DEVKIT])
    for split in ("train", "test"):
        devkit = Cars196(tmp_path / "devkit_layout", split)
        all_in_one = Cars196(tmp_path / "all_in_one", split)
        assert all_in_one.layout() == "all-in-one"
        assert sorted(devkit.labels.tolist()) == sorted(all_in_one.labels.tolist())


@pytest.mark.parametrize("where", ["cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat"])
def test_cars_devkit_labelled_test_file_in_devkit_or_beside_it(tmp_path, where):
    make_cars_devkit(tmp_path, test_file=where)
    assert len(Cars196(tmp_path, "test")) == 4


def test_cars_devkit_kaggle_nested_image_folders(tmp_path):
    make_cars_devkit(tmp_path, nested=True)
    test = Cars196(tmp_path, "test")
    assert str(test.paths[0]) == "cars_train/cars_train/00002.jpg"
    assert str(test.paths[-1]) == "cars_test/cars_test/00004.jpg"
    assert test[0][0].size == (40, 30)


def test_cars_devkit_without_labelled_test_file(tmp_path):
    make_cars_devkit(tmp_path)
    (tmp_path / "devkit" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(FileNotFoundError) as err:
        Cars196(tmp_path, "train")
    message = str(err.value)
    assert str(tmp_path / "devkit" / "cars_test_annos_withlabels.mat") in message
    assert "cars_test_annos.mat has no class labels" in message and "pytorch/vision/issues/7545" in message


HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def test_cars_html_instead_of_mat_is_one_sentence(tmp_path):
    make_cars(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(HTML_PAGE)
    with pytest.raises(DatasetFormatError) as err:
        Cars196(tmp_path, "train")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'cars_annos.mat'} is an HTML page")
    assert "download failed" in message and "https://github.com/pytorch/vision/issues/7545" in message
    assert message.count(". ") == 0 and message.count(";") == 1


def test_cars_html_annos_next_to_a_devkit_reads_the_devkit(tmp_path):
    make_cars_devkit(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(HTML_PAGE)
    assert Cars196(tmp_path, "train").layout() == "devkit"
    assert len(Cars196(tmp_path, "train")) == 4


def test_cars_html_devkit_file_named(tmp_path):
    make_cars_devkit(tmp_path)
    (tmp_path / "devkit" / "cars_train_annos.mat").write_bytes(b"  " + HTML_PAGE)
    with pytest.raises(DatasetFormatError, match="cars_train_annos.mat is an HTML page"):
        Cars196(tmp_path, "test")


def test_cars_no_annotation_file_names_both_layouts(tmp_path):
    write_image(tmp_path / "car_ims" / "000001.jpg")
    with pytest.raises(FileNotFoundError) as err:
        Cars196(tmp_path, "train")
    message = str(err.value)
    assert str(tmp_path / "cars_annos.mat") in message and "devkit/cars_train_annos.mat" in message
    assert Cars196.DOWNLOAD_URL in message


def test_cars_class_out_of_range_named(tmp_path):
    make_cars(tmp_path, classes=(1, 197), tests=(0, 0))
    with pytest.raises(DatasetFormatError, match=r"cars_annos.mat annotation 2: class .*197.* integer in 1..196"):
        Cars196(tmp_path, "train")


# -- VehicleID ------------------------------------------------------------------------------------
def make_vehicleid(root: Path) -> dict[int, list[str]]:
    """Ids 1-3 in the small test, 1-5 in medium, 1-6 in large; id 6 has one image."""
    images = {vid: [f"{vid:04d}{k:03d}" for k in range(n)] for vid, n in
              {1: 3, 2: 4, 3: 2, 4: 5, 5: 3, 6: 1, 10: 2, 11: 2}.items()}
    for names in images.values():
        for name in names:
            write_image(root / "image" / f"{name}.jpg")
    split_dir = root / "train_test_split"
    write_text(split_dir / "train_list.txt", [f"{n} {v}" for v in (10, 11) for n in images[v]])
    for size, ids in ((800, (3, 1, 2)), (1600, (1, 2, 3, 4, 5)), (2400, (1, 2, 3, 4, 5, 6))):
        write_text(split_dir / f"test_list_{size}.txt", [f"{n} {v}" for v in ids for n in images[v]])
    return images


def test_vehicleid_query_gallery_protocol(tmp_path):
    images = make_vehicleid(tmp_path)
    train = VehicleID(tmp_path, "train")
    assert len(train) == 4 and train.labels.tolist() == [0, 0, 1, 1]
    for size, ids in (("small", (1, 2, 3)), ("medium", (1, 2, 3, 4, 5)), ("large", (1, 2, 3, 4, 5, 6))):
        query, gallery = VehicleID(tmp_path, f"query_{size}"), VehicleID(tmp_path, f"gallery_{size}")
        assert len(gallery) == len(ids)  # exactly one gallery image per id
        assert len(query) == sum(len(images[v]) for v in ids) - len(ids)
        assert set(map(str, query.paths)).isdisjoint(map(str, gallery.paths))
        # labels agree across query and gallery: the vehicle id is the image name's prefix
        vehicle_of_label = {int(l): str(p)[:4] for p, l in zip(gallery.paths, gallery.labels)}
        assert len(set(vehicle_of_label.values())) == len(ids)
        for path, label in zip(query.paths, query.labels):
            assert vehicle_of_label[int(label)] == str(path)[:4]
    assert VehicleID.EVAL_TASKS["medium"] == ("query_medium", "gallery_medium")
    assert VehicleID.RECALL_KS == (1, 5)


def test_vehicleid_gallery_draw_is_deterministic_and_shared_across_sizes(tmp_path):
    make_vehicleid(tmp_path)
    small = [str(p) for p in VehicleID(tmp_path, "gallery_small").paths]
    assert small == [str(p) for p in VehicleID(tmp_path, "gallery_small").paths]
    large = {str(p) for p in VehicleID(tmp_path, "gallery_large").paths}
    assert set(small) <= large
    assert "0006000.jpg" in large  # the single-image id is gallery-only
    assert not any(str(p).startswith("0006") for p in VehicleID(tmp_path, "query_large").paths)
    other_seeds = {tuple(sorted(map(str, VehicleID(tmp_path, "gallery_large", gallery_seed=s).paths)))
                   for s in range(1, 8)}
    assert len(other_seeds) > 1  # the seed does change the draw


# -- DeepFashion2 ---------------------------------------------------------------------------------
def df2_item(category, style, box):
    return {"category_name": "x", "category_id": category, "style": style, "bounding_box": box,
            "landmarks": [], "segmentation": [], "scale": 1, "occlusion": 1, "zoom_in": 1, "viewpoint": 2}


def write_df2_image(root: Path, subset: str, name: str, source: str, pair_id: int, items: list[dict]) -> None:
    canvas = Image.new("RGB", (64, 48), (255, 255, 255))
    canvas.paste((255, 0, 0), (0, 0, 32, 24))   # red top-left quadrant
    canvas.paste((0, 0, 255), (32, 24, 64, 48))  # blue bottom-right quadrant
    (root / subset / "image").mkdir(parents=True, exist_ok=True)
    canvas.save(root / subset / "image" / f"{name}.jpg", format="JPEG", quality=98)
    annotation = {"source": source, "pair_id": pair_id}
    annotation.update({f"item{i}": item for i, item in enumerate(items, start=1)})
    write_text(root / subset / "annos" / f"{name}.json", [json.dumps(annotation)])


def make_df2(root: Path) -> None:
    red, blue = [0, 0, 32, 24], [32, 24, 64, 48]
    write_df2_image(root, "train", "000001", "user", 1, [df2_item(1, 1, red), df2_item(8, 0, blue)])
    write_df2_image(root, "train", "000002", "shop", 1, [df2_item(1, 1, blue)])
    write_df2_image(root, "train", "000003", "user", 2, [df2_item(2, 1, red), df2_item(2, 2, blue)])
    # validation: pair 7 has a style-1 match; pair 8's user item has no shop counterpart
    write_df2_image(root, "validation", "000001", "user", 7, [df2_item(1, 1, red), df2_item(9, 0, blue)])
    write_df2_image(root, "validation", "000002", "user", 8, [df2_item(3, 1, red)])
    write_df2_image(root, "validation", "000003", "shop", 7, [df2_item(1, 1, blue), df2_item(9, 0, red)])
    write_df2_image(root, "validation", "000004", "shop", 7, [df2_item(1, 2, red), df2_item(5, 0, [3, 3, 3, 9])])


def test_deepfashion2_splits_labels_and_style0(tmp_path):
    make_df2(tmp_path)
    train = DeepFashion2(tmp_path, "train")
    # style-0 item of 000001 left out; (1,1,1) user+shop share a label; (2,2,1) and (2,2,2) differ
    assert len(train) == 4
    assert train.labels.tolist() == [0, 0, 1, 2]
    gallery, query = DeepFashion2(tmp_path, "gallery"), DeepFashion2(tmp_path, "query")
    assert len(gallery) == 3  # the empty box [3,3,3,9] is left out at indexing
    assert len(query) == 1  # style-0 user item and the unmatched pair-8 item dropped
    assert str(query.paths[0]) == "validation/image/000001.jpg"
    matches = [i for i in range(len(gallery)) if gallery.labels[i] == query.labels[0]]
    assert [str(gallery.paths[i]) for i in matches] == ["validation/image/000003.jpg"]
    assert len(set(gallery.labels.tolist())) == 3  # the style-0 gallery item has a label of its own
    assert DeepFashion2.RECALL_KS == (1, 10, 20)


def test_deepfashion2_crops_by_box(tmp_path):
    make_df2(tmp_path)
    train = DeepFashion2(tmp_path, "train")
    red, _ = train[0]   # 000001 item1, box over the red quadrant
    blue, _ = train[1]  # 000002 item1, box over the blue quadrant
    assert red.size == (32, 24) and blue.size == (32, 24)
    red_px, blue_px = np.asarray(red).astype(int), np.asarray(blue).astype(int)
    assert np.abs(red_px[4:-4, 4:-4] - [255, 0, 0]).max() < 12
    assert np.abs(blue_px[4:-4, 4:-4] - [0, 0, 255]).max() < 12


def test_deepfashion2_index_built_once_and_reused(tmp_path):
    make_df2(tmp_path)
    DeepFashion2(tmp_path, "train")
    index_file = tmp_path / "xbm_index" / "train.tsv"
    assert index_file.is_file()
    assert len(read_index(index_file)) == 5
    for json_file in (tmp_path / "train" / "annos").glob("*.json"):
        json_file.unlink()  # the index alone is enough from now on
    assert len(DeepFashion2(tmp_path, "train")) == 4


def test_deepfashion2_build_index_script_function(tmp_path):
    make_df2(tmp_path)
    stats = build_index(tmp_path, "validation", tmp_path / "elsewhere" / "validation.tsv")
    assert stats == {"annotations": 4, "items": 6, "empty_boxes": 1}
    build_index(tmp_path, "train", tmp_path / "elsewhere" / "train.tsv")
    ds = DeepFashion2(tmp_path, "gallery", index_dir=tmp_path / "elsewhere")
    assert len(ds) == 3 and not (tmp_path / "xbm_index").exists()


def test_deepfashion2_bad_json_named(tmp_path):
    make_df2(tmp_path)
    write_text(tmp_path / "validation" / "annos" / "000002.json", ['{"source": "user", "pair_id": "eight"}'])
    with pytest.raises(DatasetFormatError, match="000002.json: pair_id 'eight' is not an integer"):
        DeepFashion2(tmp_path, "query")


def test_deepfashion2_missing_annotations(tmp_path):
    make_df2(tmp_path / "df2")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        DeepFashion2(tmp_path / "elsewhere", "train")
    assert str(tmp_path / "elsewhere" / "train" / "annos") in str(err.value)
    assert DeepFashion2.DOWNLOAD_URL in str(err.value) and "did you mean" not in str(err.value)


# The official format of the retrieval ground truth, written out by hand: every item of the
# validation set with its (pair_id, style); the official evaluation matches a query to the
# gallery items of the same pair_id and style > 0, whatever their categories.
OFFICIAL_VALIDATION = {
    # image: (source, pair_id, [(category_id, style), ...])
    "000001": ("user", 7, [(1, 1), (8, 2), (9, 0)]),
    "000002": ("shop", 7, [(1, 1), (7, 2)]),   # (7, 2) is trousers (8) for the user, shorts (7) here
    "000003": ("shop", 7, [(8, 0)]),           # same pair and category as a query, but style 0
    "000004": ("user", 8, [(3, 1)]),           # (8, 1) has no shop item: dropped from the queries
    "000005": ("shop", 8, [(3, 2)]),
    "000006": ("user", 9, [(10, 1), (11, 1)]),  # two items of one identity in one user image
    "000007": ("shop", 9, [(11, 1)]),
}


def item_box(image: str, item: int) -> list[int]:
    """A distinct box per item, so an item can be told from its image path and box."""
    return [item, int(image) % 7, 20 + item, 20 + int(image) % 7]


def write_official_df2(root: Path, subset: str, images: dict) -> None:
    for image, (source, pair_id, items) in images.items():
        write_df2_image(root, subset, image, source, pair_id,
                        [df2_item(cat, style, item_box(image, n)) for n, (cat, style) in enumerate(items, start=1)])


def df2_items(ds) -> list[tuple[str, int]]:
    """(image, item number) of every entry, recovered from its path and box."""
    out = []
    for path, box in zip(ds.paths, ds.boxes):
        image = Path(str(path)).stem
        out.append((image, int(box[0])))
        assert list(box) == item_box(image, int(box[0]))
    return out


def test_deepfashion2_identity_is_pair_and_style_as_the_official_evaluation(tmp_path):
    write_official_df2(tmp_path, "validation", OFFICIAL_VALIDATION)
    write_official_df2(tmp_path, "train", {"000001": ("user", 1, [(1, 1), (2, 0)]),
                                           "000002": ("shop", 1, [(5, 1), (1, 2)])})
    query, gallery = DeepFashion2(tmp_path, "query"), DeepFashion2(tmp_path, "gallery")
    assert df2_items(query) == [("000001", 1), ("000001", 2), ("000006", 1), ("000006", 2)]
    assert df2_items(gallery) == [("000002", 1), ("000002", 2), ("000003", 1), ("000005", 1), ("000007", 1)]
    expected_positives = {
        ("000001", 1): {("000002", 1)},
        ("000001", 2): {("000002", 2)},  # different categories, same (pair_id, style): a match
        ("000006", 1): {("000007", 1)},
        ("000006", 2): {("000007", 1)},
    }
    gallery_items = df2_items(gallery)
    for q_item, q_label in zip(df2_items(query), query.labels):
        positives = {g for g, g_label in zip(gallery_items, gallery.labels) if g_label == q_label}
        assert positives == expected_positives[q_item], q_item
    style0 = gallery_items.index(("000003", 1))
    assert (gallery.labels == gallery.labels[style0]).sum() == 1  # the style-0 item matches nothing
    # train: (pair 1, style 1) has a top (1) on the user side and a shirt (5) on the shop side
    train = DeepFashion2(tmp_path, "train")
    assert df2_items(train) == [("000001", 1), ("000002", 1), ("000002", 2)]
    assert train.labels.tolist() == [0, 0, 1]


def test_prepare_deepfashion2_reports_multi_category_identities(tmp_path, capsys):
    write_official_df2(tmp_path, "validation", OFFICIAL_VALIDATION)
    write_official_df2(tmp_path, "train", {"000001": ("user", 1, [(1, 1)]), "000002": ("shop", 1, [(5, 1)])})
    assert load_script("prepare_deepfashion2").main(["--root", str(tmp_path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "query: 4 items, 3 labels" in out and "gallery: 5 items, 5 labels" in out
    # user items with style > 0: 000001 x2, 000004, 000006 x2; (7, 2) spans only the trousers among
    # them, (9, 1) spans categories 10 and 11: one identity, two of the five query items
    assert "query identities spanning several categories: 1 (2 of 5 query items)" in out


def test_deepfashion2_reads_json_with_byte_order_mark(tmp_path):
    make_df2(tmp_path)
    for json_file in (tmp_path / "validation" / "annos").glob("*.json"):
        json_file.write_bytes(b"\xef\xbb\xbf" + json_file.read_bytes())
    assert len(DeepFashion2(tmp_path, "gallery")) == 3


def test_deepfashion2_root_one_level_below(tmp_path):
    make_df2(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        DeepFashion2(tmp_path / "train", "train")
    assert str(err.value).endswith(f"did you mean DATA.ROOT {tmp_path}?")
    assert str(tmp_path / "train" / "annos") in str(err.value)


# -- generic list ---------------------------------------------------------------------------------
def test_list_dataset_file_and_folder_modes(tmp_path):
    write_image(tmp_path / "imgs" / "a,b.jpg")
    write_image(tmp_path / "imgs" / "c.jpg")
    write_image(tmp_path / "imgs" / "d.jpg")
    write_text(tmp_path / "train.txt", ["imgs/a,b.jpg,7", "", "imgs/c.jpg, 3", "imgs/d.jpg,7"])
    write_text(tmp_path / "test.txt", ["imgs/c.jpg,1"])
    by_file = ListDataset(tmp_path / "train.txt")
    assert by_file.split == "train" and len(by_file) == 3
    assert [str(p) for p in by_file.paths] == ["imgs/a,b.jpg", "imgs/c.jpg", "imgs/d.jpg"]
    assert by_file.labels.tolist() == [1, 0, 1]
    by_folder = ListDataset(tmp_path, "test")
    assert len(by_folder) == 1 and by_folder[0][1] == 0
    with pytest.raises(ValueError, match="pass split"):
        ListDataset(tmp_path)


@pytest.mark.parametrize(
    "line, message",
    [("imgs/c.jpg", "line 1: expected 'relative/path,label'"),
     ("imgs/c.jpg,cat", "line 1: label 'cat' is not an integer"),
     ("../c.jpg,1", "line 1: image path '../c.jpg'")],
)
def test_list_dataset_bad_lines(tmp_path, line, message):
    write_image(tmp_path / "imgs" / "c.jpg")
    write_text(tmp_path / "train.txt", [line])
    with pytest.raises(DatasetFormatError) as err:
        ListDataset(tmp_path, "train")
    assert "train.txt" in str(err.value) and message in str(err.value)


def test_list_dataset_missing_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="test.txt"):
        ListDataset(tmp_path, "test")


def test_contiguous_labels_brute_force():
    rng = np.random.default_rng(0)
    keys = rng.integers(-50, 50, size=200).tolist()
    labels = contiguous_labels(keys, keys)
    distinct = sorted(set(keys))
    assert labels.tolist() == [distinct.index(k) for k in keys]


# -- list files saved with a UTF-8 byte-order mark, DATA.ROOT one level off ---------------------------
def make_list_folder(root: Path) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write_image(root / "imgs" / name)
    write_text(root / "train.txt", ["imgs/a.jpg,4", "imgs/b.jpg,4", "imgs/c.jpg,2"])
    write_text(root / "test.txt", ["imgs/c.jpg,1"])


# name -> (writer of the dataset tree, reader, a split, its list files, a sub-folder of the dataset)
READERS = {
    "sop": (make_sop, SOP, "train", ["Ebay_train.txt", "Ebay_test.txt"], "bicycle_final"),
    "cub": (make_cub, CUB200, "train", ["images.txt", "image_class_labels.txt"], "images"),
    "inshop": (make_inshop, InShop, "query", ["Eval/list_eval_partition.txt"], "img"),
    "vehicleid": (make_vehicleid, VehicleID, "query_small", ["train_test_split/test_list_800.txt"], "image"),
    "list": (make_list_folder, ListDataset, "train", ["train.txt"], "imgs"),
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_list_files_with_byte_order_mark_read_as_without(tmp_path, name):
    make, reader, split, list_files, _ = READERS[name]
    make(tmp_path / "plain")
    make(tmp_path / "bom")
    for list_file in list_files:
        path = tmp_path / "bom" / list_file
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # what Notepad's "UTF-8 with BOM" writes
        assert path.read_text(encoding="utf-8").startswith("\ufeff")
    plain, bom = reader(tmp_path / "plain", split), reader(tmp_path / "bom", split)
    assert len(bom) == len(plain) > 0
    assert [str(p) for p in bom.paths] == [str(p) for p in plain.paths]
    assert bom.labels.tolist() == plain.labels.tolist()


@pytest.mark.parametrize("name", sorted(READERS))
def test_root_one_level_above_names_the_dataset_folder(tmp_path, name):
    make, reader, split, list_files, _ = READERS[name]
    make(tmp_path / "datasets" / "the_dataset")
    with pytest.raises(FileNotFoundError) as err:
        reader(tmp_path / "datasets", split)
    message = str(err.value)
    assert message.endswith(f"did you mean DATA.ROOT {tmp_path / 'datasets' / 'the_dataset'}?")
    assert str(tmp_path / "datasets" / "the_dataset") in message.split(" exists;")[0]  # where it was found
    assert message.count("?") == 1 and "\n" not in message


@pytest.mark.parametrize("name", sorted(READERS))
def test_root_one_level_below_names_the_dataset_folder(tmp_path, name):
    make, reader, split, _, subfolder = READERS[name]
    make(tmp_path / "the_dataset")
    assert (tmp_path / "the_dataset" / subfolder).is_dir()
    with pytest.raises(FileNotFoundError) as err:
        reader(tmp_path / "the_dataset" / subfolder, split)
    assert str(err.value).endswith(f"did you mean DATA.ROOT {tmp_path / 'the_dataset'}?")


def test_cars_root_one_level_off_in_either_layout(tmp_path):
    make_cars(tmp_path / "all_in_one" / "cars")
    make_cars_devkit(tmp_path / "devkit_layout" / "stanford_cars")
    with pytest.raises(FileNotFoundError, match=r"cars_annos.mat exists; did you mean DATA.ROOT .*all_in_one/cars\?$"):
        Cars196(tmp_path / "all_in_one", "train")
    with pytest.raises(FileNotFoundError) as err:
        Cars196(tmp_path / "devkit_layout" / "stanford_cars" / "devkit", "train")
    assert str(err.value).endswith(f"did you mean DATA.ROOT {tmp_path / 'devkit_layout' / 'stanford_cars'}?")


def test_root_off_through_build_dataset(tmp_path):
    from xbm.config import get_cfg
    from xbm.data.datasets import build_dataset

    make_cub(tmp_path / "CUB_200_2011")
    cfg = get_cfg()
    cfg.DATA.NAME, cfg.DATA.ROOT = "cub200", str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"images.txt exists; did you mean DATA.ROOT .*CUB_200_2011\?$"):
        build_dataset(cfg, "train")
    cfg.DATA.ROOT = str(tmp_path / "CUB_200_2011")
    assert len(build_dataset(cfg, "train")) == 3


def test_sop_header_with_byte_order_mark(tmp_path):
    """The header check was what failed: '\ufeffimage_id' is not 'image_id'."""
    make_sop(tmp_path)
    path = tmp_path / "Ebay_train.txt"
    path.write_text("\ufeff" + path.read_text(encoding="utf-8"), encoding="utf-8")
    assert len(SOP(tmp_path, "train")) == 5


def test_cub_first_id_with_byte_order_mark(tmp_path):
    """'\ufeff1' is not an integer: the first image id was what failed."""
    make_cub(tmp_path)
    for name in ("images.txt", "image_class_labels.txt"):
        path = tmp_path / name
        path.write_text(path.read_text(encoding="utf-8"), encoding="utf-8-sig")
    train = CUB200(tmp_path, "train")
    assert str(train.paths[0]) == "001.Black_footed_Albatross/A_0001.jpg" and train.labels.tolist() == [0, 0, 1]
