"""The datasets of recipes/paper.py: where each lives under ``--data-root``, which table uses it,
what a correct copy looks like, and how its files and class names are read.

Folder names follow DomainBed's and CoOp's download scripts (docs/official_code.md §4.3–§5):
DomainBed trees ``<folder>/<domain>/<class>/<image>`` (Tables 1 and 4), CoOp's datasets with
their ``split_zhou_<name>.json`` split files (Table 3; ImageNet and FGVCAircraft read their own
files), and ImageNet with its shifted test sets beside it (Table 2). The split rules themselves
live in :mod:`clipood_plugin.protocols`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clipood_plugin.classnames import duplicate_classnames
from clipood_plugin.protocols import ImageRecord
from clipood_plugin.protocols.domainbed import list_image_folder
from clipood_plugin.protocols.imagenet import imagenet_records, parse_classnames

__all__ = [
    "COOP",
    "DOMAINBED",
    "IMAGENET_VARIANTS",
    "TABLES",
    "Dataset",
    "check_layout",
    "dataset_dir",
    "find_dataset",
    "read_coop",
    "unique_keys",
]

_LOG = logging.getLogger("paper")


@dataclass(frozen=True)
class Dataset:
    """Where a dataset lives under ``--data-root`` and what a correct copy of it looks like."""

    name: str
    folder: str
    domains: tuple[str, ...] = ()  # DomainBed: the domain folders, sorted (= DomainBed's environment order)
    num_classes: int | None = None
    split_file: str | None = None  # CoOp: split_zhou_<name>.json, paths relative to image_dir
    image_dir: str = ""


DOMAINBED: dict[str, Dataset] = {
    "PACS": Dataset("PACS", "PACS", ("art_painting", "cartoon", "photo", "sketch"), 7),
    "VLCS": Dataset("VLCS", "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5),
    "OfficeHome": Dataset("OfficeHome", "office_home", ("Art", "Clipart", "Product", "Real World"), 65),
    "TerraIncognita": Dataset("TerraIncognita", "terra_incognita",
                              ("location_100", "location_38", "location_43", "location_46"), 10),
    "DomainNet": Dataset("DomainNet", "domain_net",
                         ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"), 345),
}
COOP: dict[str, Dataset] = {
    "ImageNet": Dataset("ImageNet", "imagenet", num_classes=1000),
    "Caltech101": Dataset("Caltech101", "caltech-101", num_classes=100, split_file="split_zhou_Caltech101.json",
                          image_dir="101_ObjectCategories"),
    "OxfordPets": Dataset("OxfordPets", "oxford_pets", num_classes=37, split_file="split_zhou_OxfordPets.json",
                          image_dir="images"),
    "StanfordCars": Dataset("StanfordCars", "stanford_cars", num_classes=196,
                            split_file="split_zhou_StanfordCars.json"),
    "OxfordFlowers": Dataset("OxfordFlowers", "oxford_flowers", num_classes=102,
                             split_file="split_zhou_OxfordFlowers.json", image_dir="jpg"),
    "Food101": Dataset("Food101", "food-101", num_classes=101, split_file="split_zhou_Food101.json",
                       image_dir="images"),
    "FGVCAircraft": Dataset("FGVCAircraft", "fgvc_aircraft", num_classes=100, image_dir="images"),
    "SUN397": Dataset("SUN397", "sun397", num_classes=397, split_file="split_zhou_SUN397.json", image_dir="SUN397"),
    "DescribableTextures": Dataset("DescribableTextures", "dtd", num_classes=47,
                                   split_file="split_zhou_DescribableTextures.json", image_dir="images"),
    "EuroSAT": Dataset("EuroSAT", "eurosat", num_classes=10, split_file="split_zhou_EuroSAT.json", image_dir="2750"),
    "UCF101": Dataset("UCF101", "ucf101", num_classes=101, split_file="split_zhou_UCF101.json",
                      image_dir="UCF-101-midframes"),
}
#: Table 2's shifted test sets: eval name → (folder under --data-root, image folder inside it), CoOp's layout.
IMAGENET_VARIANTS: dict[str, tuple[str, str]] = {
    "imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val"),
    "imagenet_sketch": ("imagenet-sketch", "images"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r"),
}
TABLES: dict[int, tuple[str, tuple[str, ...]]] = {
    1: ("domain shift: DomainBed leave-one-domain-out, one run per target domain, mean over targets",
        tuple(DOMAINBED)),
    2: ("16-shot ImageNet → ImageNet, -V2, -Sketch (1000-way), -A, -R (200-way)", ("ImageNet",)),
    3: ("open class: CoOp base-to-new, 16 shots, ⌈K/2⌉ base classes, H = harmonic mean", tuple(COOP)),
    4: ("in the wild: ⌊K/2⌋ base classes; the whole target domain tested among all K names",
        ("OfficeHome", "DomainNet")),
}
_ALIASES = {"dtd": "DescribableTextures", "flowers102": "OxfordFlowers", "oxford_flowers": "OxfordFlowers",
            "terra_incognita": "TerraIncognita", "office_home": "OfficeHome", "domain_net": "DomainNet"}


def find_dataset(table: int, name: str) -> Dataset:
    """The dataset ``name`` of ``table`` (case-insensitive; ``DTD`` and DomainBed folder names accepted)."""
    wanted = _ALIASES.get(name.lower(), name).lower()
    for candidate in TABLES[table][1]:
        if candidate.lower() == wanted:
            return DOMAINBED.get(candidate) or COOP[candidate]
    raise ValueError(f"Table {table} has no dataset {name!r}; its datasets are {', '.join(TABLES[table][1])}")


def dataset_dir(root: Path, dataset: Dataset) -> Path:
    """``root/<folder>`` (``root`` = CoOp's / DomainBed's ``$DATA``), or ``root`` itself if it is the dataset."""
    if not root.is_dir():
        raise FileNotFoundError(f"--data-root {str(root)!r} is not a directory")
    if (root / dataset.folder).is_dir():
        return root / dataset.folder
    markers = [*dataset.domains, dataset.split_file or "", "variants.txt", "images", "train"]
    if root.name == dataset.folder or any(m and (root / m).exists() for m in markers):
        return root
    raise FileNotFoundError(
        f"{dataset.name}: expected the folder {str(root / dataset.folder)!r} (see `recipes/paper.py --help` for the layout)"
    )


def check_layout(dataset: Dataset, domains: Sequence[str], classnames: Sequence[str], strict: bool) -> None:
    """A wrong --data-root or a partial download should fail here, not as a strange number later."""
    problems = []
    if dataset.domains and tuple(domains) != dataset.domains:
        problems.append(f"domain folders {list(domains)} (expected {list(dataset.domains)})")
    if dataset.num_classes is not None and len(classnames) != dataset.num_classes:
        problems.append(f"{len(classnames)} classes (expected {dataset.num_classes})")
    if not problems:
        return
    message = f"{dataset.name}: found " + " and ".join(problems)
    if strict:
        raise ValueError(message + "; pass --no-layout-check to run on it anyway")
    _LOG.warning("%s (--no-layout-check: going on)", message)


def unique_keys(names: Sequence[str]) -> list[str]:
    """Class list stored beside the shards, which must hold no repeat (:mod:`clipood_plugin.classnames`):
    the names when none repeats, else ``<index>_<name>``."""
    names = [str(n) for n in names]
    return names if not duplicate_classnames(names) else [f"{i:04d}_{n}" for i, n in enumerate(names)]


def read_coop(dataset: Dataset, folder: Path) -> tuple[list[ImageRecord], list[ImageRecord] | None,
                                                         list[ImageRecord], list[str], list[str]]:
    """(train, val, test, class names, class keys) of a CoOp dataset, from CoOp's own split files.

    ImageNet: ``images/{train,val}/<wnid>/`` and ``classnames.txt`` (no val: CoOp tests on ImageNet's
    val set). FGVCAircraft: ``variants.txt`` and ``images_variant_{train,val,test}.txt``. The others:
    ``split_zhou_<name>.json`` (``[path, label, classname]`` lists). A dataset without its split file
    may be laid out as ``{train,val,test}/<class>/<image>`` instead (val optional).
    """
    if dataset.name == "ImageNet":
        wnids, names = parse_classnames((folder / "classnames.txt").read_text(encoding="utf-8"))
        train = imagenet_records(folder / "images" / "train", wnids)
        test = imagenet_records(folder / "images" / "val", wnids)
        return train, None, test, names, wnids
    if dataset.name == "FGVCAircraft" and (folder / "variants.txt").is_file():
        variants = [line.strip() for line in (folder / "variants.txt").read_text().splitlines() if line.strip()]
        index = {name: i for i, name in enumerate(variants)}
        parts: dict[str, list[ImageRecord]] = {}
        for part in ("train", "val", "test"):
            parts[part] = []
            for lineno, line in enumerate((folder / f"images_variant_{part}.txt").read_text().splitlines(), 1):
                image, _, variant = line.strip().partition(" ")
                if not image:
                    continue
                if variant not in index:
                    raise ValueError(f"images_variant_{part}.txt:{lineno}: {variant!r} is not in variants.txt")
                parts[part].append(ImageRecord(str(folder / dataset.image_dir / f"{image}.jpg"), index[variant]))
        return parts["train"], parts["val"], parts["test"], variants, unique_keys(variants)
    split_file = folder / (dataset.split_file or "")
    if dataset.split_file and split_file.is_file():
        return _read_split_json(split_file, folder / dataset.image_dir)
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        names, train = list_image_folder(folder / "train")
        val = None
        if (folder / "val").is_dir():
            val_names, val = list_image_folder(folder / "val")
            _same_classes(names, val_names, folder / "val")
        test_names, test = list_image_folder(folder / "test")
        _same_classes(names, test_names, folder / "test")
        return train, val, test, names, unique_keys(names)
    expected = dataset.split_file or "images_variant_{train,val,test}.txt and variants.txt"
    raise FileNotFoundError(f"{dataset.name}: no {expected} (CoOp's split) and no train/ + test/ class folders "
                            f"under {str(folder)!r}")


def _same_classes(names: list[str], other: list[str], where: Path) -> None:
    if other != names:
        raise ValueError(f"{str(where)!r} has other class folders than train/: {sorted(set(other) ^ set(names))[:5]}")


def _read_split_json(path: Path, image_dir: Path) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord],
                                                           list[str], list[str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    names_by_label: dict[int, str] = {}
    parts: dict[str, list[ImageRecord]] = {}
    for part in ("train", "val", "test"):
        if part not in data:
            raise ValueError(f"{path}: no {part!r} list (expected CoOp's split_zhou format)")
        parts[part] = []
        for entry in data[part]:
            if not isinstance(entry, list) or len(entry) != 3:
                raise ValueError(f"{path}: {part} entry {entry!r} is not [path, label, classname]")
            rel, label, cname = str(entry[0]), int(entry[1]), str(entry[2])
            if names_by_label.setdefault(label, cname) != cname:
                raise ValueError(f"{path}: label {label} is named both {names_by_label[label]!r} and {cname!r}")
            parts[part].append(ImageRecord(str(image_dir / rel), label))
    missing = [i for i in range(max(names_by_label) + 1) if i not in names_by_label]
    if missing:
        raise ValueError(f"{path}: labels {missing[:5]} have no images, so no class name")
    names = [names_by_label[i] for i in range(len(names_by_label))]
    return parts["train"], parts["val"], parts["test"], names, unique_keys(names)

