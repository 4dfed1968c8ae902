"""recipes/paper.py: protocol splits → cached shards → the recipe, on small fake dataset trees.

The split rules are tested in test_protocols.py; here the question is whether the driver wires
them into shards correctly, so expectations are computed independently (DomainBed's md5
``seed_hash`` and numpy shuffle written out again, class counts from the paper). Every config
under recipes/configs is dry-run (tiny random-init CLIP, 2 steps) so none of them rots.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import paper  # noqa: E402

sys.path.pop(0)

from clipood_plugin.templates import CLIPOOD_TEMPLATES  # noqa: E402

# docs/official_code.md §5 (official scripts.sh), typed in independently of the configs:
# dataset → (batch per domain or per step, lr, epochs, λ, β)
SCRIPTS = {
    (1, "PACS"): (12, 5e-6, 10, 0.3, 0.5), (1, "VLCS"): (12, 5e-6, 10, 0.3, 0.5),
    (1, "OfficeHome"): (12, 1e-5, 10, 0.3, 0.5), (1, "TerraIncognita"): (12, 5e-6, 10, 0.3, 0.5),
    (1, "DomainNet"): (12, 1e-5, 20, 0.3, 0.5),
    (2, "ImageNet"): (36, 5e-6, 10, 0.3, 0.5),  # no script: the open-class ImageNet line, paper β
    (3, "ImageNet"): (36, 5e-6, 10, 0.3, 0.1), (3, "Caltech101"): (36, 5e-6, 1, 0.3, 0.1),
    (3, "OxfordPets"): (36, 5e-6, 1, 0.3, 0.1), (3, "StanfordCars"): (36, 5e-6, 5, 0.3, 0.1),
    (3, "OxfordFlowers"): (36, 5e-6, 1, 0.3, 0.1), (3, "Food101"): (36, 5e-6, 1, 0.3, 0.1),
    (3, "FGVCAircraft"): (36, 5e-6, 10, 0.3, 0.1), (3, "SUN397"): (36, 5e-6, 5, 0.3, 0.1),
    (3, "DescribableTextures"): (36, 5e-6, 1, 0.3, 0.1), (3, "EuroSAT"): (36, 5e-6, 1, 0.3, 0.1),
    (3, "UCF101"): (36, 5e-6, 2, 0.3, 0.1),
    (4, "OfficeHome"): (12, 3e-6, 10, 0.1, 0.1), (4, "DomainNet"): (12, 5e-6, 20, 0.1, 0.5),
}
CASES = sorted(SCRIPTS)

DOMAINBED_TREES = {  # folder: (domains, classes, images per class and domain)
    "PACS": (("art_painting", "cartoon", "photo", "sketch"),
             ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"], 5),
    "VLCS": (("Caltech101", "LabelMe", "SUN09", "VOC2007"), ["bird", "car", "chair", "dog", "person"], 5),
    "office_home": (("Art", "Clipart", "Product", "Real World"), [f"Class_{i:02d}" for i in range(65)], 2),
    "terra_incognita": (("location_100", "location_38", "location_43", "location_46"),
                        [f"animal_{i}" for i in range(10)], 5),
    "domain_net": (("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
                   [f"thing_{i:03d}" for i in range(345)], 1),
}
COOP_CLASSES = ["alpha", "beta_thing", "gamma", "delta", "epsilon"]
WNIDS = [f"n0000000{i}" for i in range(6)]
WNID_NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only spins on this shared machine
    yield
    torch.set_num_threads(before)


_RNG = np.random.default_rng(0)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$DATA holding every DomainBed and CoOp dataset (tiny), in the download scripts' layouts."""
    root = tmp_path_factory.mktemp("data")
    for folder, (domains, classes, per) in DOMAINBED_TREES.items():
        for d in domains:
            for c in classes:
                for i in range(per):
                    _png(root / folder / d / c / f"img.{i}.png")  # a dot in the stem: keys must not keep it
    for name, ds in paper.COOP.items():
        folder = root / ds.folder
        if name == "ImageNet":
            (folder).mkdir()
            (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, WNID_NAMES)))
            for w in WNIDS:
                for split, n in (("train", 3), ("val", 2)):
                    for i in range(n):
                        _png(folder / "images" / split / w / f"{w}_{i}.png")
            continue
        per = {"train": 18, "val": 5, "test": 2} if name == "Caltech101" else {"train": 2, "val": 1, "test": 1}
        entries: dict[str, list] = {}
        for split, n in per.items():
            entries[split] = []
            for label, cname in enumerate(COOP_CLASSES):
                for i in range(n):
                    rel = f"{cname}/{split}_{i}.png"
                    _png(folder / ds.image_dir / rel)
                    entries[split].append([rel, label, cname])
        if name == "FGVCAircraft":  # CoOp reads Aircraft from the dataset's own text files
            (folder / "variants.txt").write_text("".join(f"{c}\n" for c in COOP_CLASSES))
            for split, items in entries.items():
                lines = []
                for rel, _, cname in items:
                    image = rel.replace("/", "_").removesuffix(".png")
                    (folder / ds.image_dir / rel).rename(folder / ds.image_dir / f"{image}.jpg")
                    lines.append(f"{image} {cname}\n")
                (folder / f"images_variant_{split}.txt").write_text("".join(lines))
        else:
            (folder / ds.split_file).write_text(json.dumps(entries))
    variant_wnids = {"imagenet-sketch/images": WNIDS, "imagenet-adversarial/imagenet-a": [WNIDS[4], WNIDS[1], WNIDS[2]],
                     "imagenet-rendition/imagenet-r": [WNIDS[0], WNIDS[3], WNIDS[5], WNIDS[2]]}
    for sub, wnids in variant_wnids.items():
        for w in wnids:
            _png(root / sub / w / "x.png")
    (root / "imagenet-rendition/imagenet-r/README.txt").write_text("a file beside the class folders")
    for i in range(6):
        _png(root / "imagenetv2/imagenetv2-matched-frequency-format-val" / str(i) / "v.png")
    return root


class DryRuns(dict):
    """(table, dataset) → {"summary", "out"}: each dry run done once per module, on first use."""

    def __init__(self, data_root: Path, out: Path) -> None:
        super().__init__()
        self.data_root, self.out = data_root, out

    def __missing__(self, key: tuple[int, str]) -> dict[str, Any]:
        table, name = key
        argv = ["--table", str(table), "--dataset", name, "--data-root", str(self.data_root), "--output",
                str(self.out), "--dry-run", "--convert-workers", "1", "--no-progress"]
        if table in (1, 4) and name != "PACS":  # PACS runs every target; the others their first
            argv += ["--targets", "0"]
        if table in (2, 3):
            argv.append("--no-layout-check")  # 5 (or 6) classes stand in for the real class lists
        self[key] = {"summary": paper.main(argv), "out": self.out, "argv": argv}
        return self[key]


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> DryRuns:
    return DryRuns(data_root, tmp_path_factory.mktemp("out"))


def run_dirs(run: dict[str, Any], table: int, name: str) -> list[Path]:
    base = run["out"] / f"table{table}" / f"{name}-dry-run"
    return sorted(p.parent for p in base.rglob("paper_run.json"))


def argv_of(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "paper_run.json").read_text())["recipe_argv"]


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def eval_set(argv: list[str], name: str) -> tuple[str, list[str]]:
    spec = next(v for v in flag_values(argv, "--eval-shards") if v.startswith(f"{name}="))
    urls, _, names = spec.partition("=")[2].partition("|")
    return urls, json.loads(Path(names).read_text())


def read_shards(urls: str) -> list[tuple[str, int, str | None]]:
    """(key, label, domain) of every sample, in shard order, straight from the tar files."""
    samples = []
    for directory in urls.split("::"):
        for shard in sorted(Path(directory).glob("*.tar")):
            with tarfile.open(shard) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            keys = [n.rsplit(".", 1)[0] for n in members if n.endswith(".png")]
            for key in keys:
                domain = members.get(f"{key}.domain")
                samples.append((key, int(members[f"{key}.cls"]), domain.decode() if domain else None))
    return samples


def md5_seed(*args: object) -> int:
    """DomainBed's misc.seed_hash, written out: md5 of str(args), as an int, mod 2**31."""
    return int(hashlib.md5(str(args).encode()).hexdigest(), 16) % 2**31


def holdout(n: int, seed: int) -> tuple[list[int], list[int]]:
    """DomainBed's split_dataset on indices: (in, out), out = the first int(0.2·n) of the shuffle."""
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    n_out = int(n * 0.2)
    return keys[n_out:], keys[:n_out]


def domain_keys(folder: str, domain: str) -> list[tuple[str, int]]:
    """(shard key, label) of a fake domain in ImageFolder order: sorted classes, sorted files."""
    _, classes, per = DOMAINBED_TREES[folder]
    return [(f"{domain}/{c}/img_{i}", label) for label, c in enumerate(sorted(classes)) for i in range(per)]


# ---------------------------------------------------------------------------------------------
# Configs and the command line (no training)


@pytest.mark.parametrize("table,name", CASES)
def test_each_config_holds_the_scripts_hyperparameters(table: int, name: str) -> None:
    config = paper.config_path(table, paper.find_dataset(table, name))
    settings = yaml.safe_load(config.read_text())
    batch, lr, epochs, lam, beta = SCRIPTS[(table, name)]
    assert (settings["batch_size"], settings["epochs"], settings["iters_per_epoch"]) == (batch, epochs, 500)
    assert math.isclose(settings["lr"], lr) and isinstance(settings["lr"], float)  # YAML reads "5e-6" as a str
    assert (settings["mms_lambda"], settings["bma_beta"]) == (lam, beta)
    assert (settings["model"], settings["pretrained"], settings["weight_decay"], settings["warmup_steps"]) == (
        "ViT-B-16", "openai", 0.1, 0)
    assert CLIPOOD_TEMPLATES[settings["template"]] == CLIPOOD_TEMPLATES[name]  # the paper's one template
    header = config.read_text().split("\n\n")[0]
    assert "docs/official_code.md §5" in header and "Paper vs scripts:" in header
    recipe = paper.load_recipe()
    args = recipe.parse_args(["-c", str(config)])  # every key is a recipe flag
    assert args.lr == lr and args.iters_per_epoch == 500


def test_every_config_file_is_a_table_row() -> None:
    on_disk = {p.name for p in paper.CONFIGS.glob("table*.yaml")}
    assert on_disk == {paper.config_path(t, paper.find_dataset(t, n)).name for t, n in CASES}
    numbers = yaml.safe_load(paper.PAPER_NUMBERS.read_text())
    assert all(numbers[f"table{t}"]["source"] for t in paper.TABLES)


def test_help_lists_every_table_and_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        paper.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for table, (_, datasets) in paper.TABLES.items():
        assert f"--table {table}" in text
        assert all(name in text for name in datasets)
    assert "split_zhou_EuroSAT.json" in text and "Real World" in text


def test_bad_invocations_are_named(data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        paper.parse_args(["--table", "3", "--dataset", "PACS", "--data-root", str(data_root)])
    assert "Table 3 has no dataset 'PACS'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper.parse_args(["--table", "3", "--dataset", "dtd", "--data-root", str(data_root), "--targets", "0"])
    assert "--targets applies to tables 1 and 4" in capsys.readouterr().err
    args = paper.parse_args(["--table", "3", "--dataset", "dtd", "--data-root", "x", "--", "--amp", "fp16"])
    assert args.dataset_spec.name == "DescribableTextures" and args.recipe_args == ["--amp", "fp16"]
    with pytest.raises(ValueError, match=r"found 5 classes \(expected 10\).*--no-layout-check"):
        paper.main(["--table", "3", "--dataset", "EuroSAT", "--data-root", str(data_root), "--dry-run",
                    "--output", str(data_root.parent / "bad"), "--convert-workers", "1", "--no-progress"])


def test_repeated_prompt_names_tie_or_get_numbered(capsys: pytest.CaptureFixture[str]) -> None:
    names = ["missile", "tank", "missile", "sunglasses", "sunglasses", "sunglasses"]
    assert paper.prompt_names(names) == names  # kept: identical prompts, tied logits (official behaviour)
    assert "['missile', 'sunglasses']" in capsys.readouterr().err
    assert paper.prompt_names(names, rename_duplicates=True) == [
        "missile", "tank", "missile (2)", "sunglasses", "sunglasses (2)", "sunglasses (3)"]
    assert paper.prompt_names(["Alarm_Clock", "Alarm Clock"], rename_duplicates=True)[1] == "Alarm Clock (2)"


# ---------------------------------------------------------------------------------------------
# Splits into shards, checked against independent computations


def test_domainbed_shards_follow_the_seed_hash_holdout(runs: DryRuns) -> None:
    run = runs[(1, "PACS")]
    domains = DOMAINBED_TREES["PACS"][0]
    dirs = run_dirs(run, 1, "PACS")
    assert [d.name for d in dirs] == sorted(domains)  # one run per target domain
    for target in domains:
        argv = argv_of(next(d for d in dirs if d.name == target))
        per_domain = dict(v.split("=", 1) for v in flag_values(argv, "--train-shards-per-domain"))
        assert list(per_domain) == [d for d in domains if d != target]  # sources, in sorted order
        val = []
        for env_i, d in enumerate(domains):
            files = domain_keys("PACS", d)
            in_, out = holdout(len(files), md5_seed(0, env_i))
            if d == target:
                test = read_shards(eval_set(argv, "test")[0])
                assert [(k, y) for k, y, _ in test] == [files[i] for i in out]  # the target's 20 % "out"
            else:
                train = read_shards(per_domain[d])
                assert [(k, y) for k, y, _ in train] == [files[i] for i in in_]
                assert {dom for _, _, dom in train} == {d}
                val += [files[i] for i in out]
        assert [(k, y) for k, y, _ in read_shards(eval_set(argv, "val")[0])] == val
        assert eval_set(argv, "test")[1] == sorted(DOMAINBED_TREES["PACS"][1])
    # a source's 80 % split is written once and shared by the three runs that train on it
    cache = run["out"] / "shards" / "PACS"
    assert len(list(cache.glob("*-in-*"))) == len(list(cache.glob("*-out-*"))) == 4


def test_table1_row_is_the_mean_over_targets(runs: DryRuns) -> None:
    run = runs[(1, "PACS")]
    rows = run["summary"]["rows"]
    per_target = [json.loads((d / "results.json").read_text()) for d in run_dirs(run, 1, "PACS")]
    assert [r["label"] for r in rows] == [*sorted(DOMAINBED_TREES["PACS"][0]), "average"]
    for key, prefix in (("zero_shot", "eval_zs"), ("fine_tuned", "eval"), ("clipood", "eval_bma")):
        mean = sum(r[f"{prefix}_test_top1"] for r in per_target) / len(per_target)
        assert rows[-1]["ours"][key] == pytest.approx(mean)
    assert rows[-1]["paper"] == {"zero_shot": 96.2, "clipood": 97.3}


@pytest.mark.parametrize("name,folder,n_base", [("OfficeHome", "office_home", 32), ("DomainNet", "domain_net", 172)])
def test_in_the_wild_takes_floor_half_as_base_and_tests_the_whole_target(
        runs: DryRuns, name: str, folder: str, n_base: int) -> None:
    run = runs[(4, name)]
    (run_dir,) = run_dirs(run, 4, name)
    argv = argv_of(run_dir)
    domains, classes, per = DOMAINBED_TREES[folder]
    k = len(classes)
    assert (n_base, k - n_base) == ((32, 33) if k == 65 else (172, 173))
    train_names = json.loads(Path(flag_values(argv, "--classnames")[0]).read_text())
    assert train_names == sorted(classes)[:n_base]
    test_base, base_names = eval_set(argv, "test_base")
    test_new, new_names = eval_set(argv, "test_new")
    assert base_names == new_names == sorted(classes)  # both classified among all K names
    target = domains[0]
    files = domain_keys(folder, target)
    assert sorted(read_shards(test_base)) == sorted((f, y, target) for f, y in files if y < n_base)
    assert sorted(read_shards(test_new)) == sorted((f, y, target) for f, y in files if y >= n_base)
    per_domain = dict(v.split("=", 1) for v in flag_values(argv, "--train-shards-per-domain"))
    for env_i, d in enumerate(domains[1:], start=1):
        base_files = [f for f in domain_keys(folder, d) if f[1] < n_base]
        in_, _ = holdout(len(base_files), md5_seed(0, env_i, "base"))
        assert [(key, y) for key, y, _ in read_shards(per_domain[d])] == [base_files[i] for i in in_]
    # Total: top-1 over all target images = the count-weighted mean of base and new
    results = json.loads((run_dir / "results.json").read_text())
    b, n = results["eval_zs_test_base_top1"], results["eval_zs_test_new_top1"]
    nb, nn = n_base * per, (k - n_base) * per
    total = next(r for r in run["summary"]["rows"] if r["metric"] == "total")
    assert total["ours"]["zero_shot"] == pytest.approx((b * nb + n * nn) / (nb + nn))


def test_base_to_new_writes_16_shots_of_the_ceil_half_base_classes(runs: DryRuns, data_root: Path) -> None:
    run = runs[(3, "Caltech101")]
    (run_dir,) = run_dirs(run, 3, "Caltech101")
    argv = argv_of(run_dir)
    split = json.loads((data_root / "caltech-101" / "split_zhou_Caltech101.json").read_text())
    n_base = math.ceil(len(COOP_CLASSES) / 2)  # 5 classes → 3 base, 2 new
    train = read_shards(flag_values(argv, "--train-shards")[0])
    assert json.loads(Path(flag_values(argv, "--classnames")[0]).read_text()) == COOP_CLASSES[:n_base]
    assert sorted(np.bincount([y for _, y, _ in train]).tolist()) == [16] * n_base  # 16 of 18 per class
    base_train = {f"101_ObjectCategories/{rel[:-4]}" for rel, y, _ in split["train"] if y < n_base}
    assert {key for key, _, _ in train} <= base_train
    val, _ = eval_set(argv, "val")
    assert np.bincount([y for _, y, _ in read_shards(val)]).tolist() == [4] * n_base  # CoOp: min(16, 4) shots
    test_base, base_names = eval_set(argv, "test_base")
    test_new, new_names = eval_set(argv, "test_new")
    assert (base_names, new_names) == (COOP_CLASSES[:n_base], COOP_CLASSES[n_base:])
    expect = {(f"101_ObjectCategories/{rel[:-4]}", y if y < n_base else y - n_base)
              for rel, y, _ in split["test"]}
    got = {(k, y) for k, y, _ in read_shards(test_base)} | {(k, y) for k, y, _ in read_shards(test_new)}
    assert got == expect and len(read_shards(test_new)) == 2 * (len(COOP_CLASSES) - n_base)
    h = next(r for r in run["summary"]["rows"] if r["metric"] == "H")["ours"]["clipood"]
    base, new = (next(r for r in run["summary"]["rows"] if r["metric"] == m)["ours"]["clipood"] for m in ("base", "new"))
    assert h == pytest.approx(0.0 if base + new == 0 else 2 * base * new / (base + new))


def test_imagenet_a_and_r_are_evaluated_among_their_own_classes(runs: DryRuns) -> None:
    run = runs[(2, "ImageNet")]
    (run_dir,) = run_dirs(run, 2, "ImageNet")
    argv = argv_of(run_dir)
    subsets = dict(v.split("=", 1) for v in flag_values(argv, "--eval-class-subset"))
    a_index = sorted(WNIDS.index(w) for w in [WNIDS[4], WNIDS[1], WNIDS[2]])  # sorted wnids → positions
    r_index = sorted(WNIDS.index(w) for w in [WNIDS[0], WNIDS[3], WNIDS[5], WNIDS[2]])
    assert subsets == {"imagenet_a": ",".join(map(str, a_index)), "imagenet_r": ",".join(map(str, r_index))}
    for name in ("imagenet_a", "imagenet_r"):  # shard labels are 1000-space (here 6-space) indices
        urls, names = eval_set(argv, name)
        assert names == WNID_NAMES
        assert {(key.split("/")[-2], y) for key, y, _ in read_shards(urls)} == {
            (WNIDS[i], i) for i in map(int, subsets[name].split(","))}
    v2 = read_shards(eval_set(argv, "imagenet_v2")[0])
    assert sorted(y for _, y, _ in v2) == list(range(6))
    assert {int(k.split("/")[-2]) for k, _, _ in v2} == set(range(6))  # folder number = label
    results = json.loads((run_dir / "results.json").read_text())
    row = {r["label"]: r for r in run["summary"]["rows"]}
    four = [results[f"eval_bma_{n}_top1"] for n in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")]
    assert row["ood_average"]["ours"]["clipood"] == pytest.approx(sum(four) / 4)
    assert row["imagenet_a"]["paper"] == {"zero_shot": 47.8, "clipood": 50.4}


# ---------------------------------------------------------------------------------------------
# Every config, dry-run end to end


@pytest.mark.parametrize("table,name", CASES)
def test_every_config_dry_runs(runs: DryRuns, table: int, name: str) -> None:
    run = runs[(table, name)]
    summary = run["summary"]
    assert summary["dry_run"] and summary["rows"]
    assert summary["numerics"] == "official numerics, official augment"
    for row in summary["rows"]:
        for value in row["ours"].values():
            assert value is not None and 0.0 <= value <= 100.0
    settings = yaml.safe_load(paper.config_path(table, paper.find_dataset(table, name)).read_text())
    for run_dir in run_dirs(run, table, name):
        results = json.loads((run_dir / "results.json").read_text())
        assert results["step"] == results["total_steps"] == 2 and results["skipped"] == 0
        used = yaml.safe_load((run_dir / "args.yaml").read_text())  # what the recipe actually ran with
        for key in ("lr", "mms_lambda", "bma_beta", "template", "weight_decay", "eval_metric", "loss",
                    "numerics", "augment"):
            assert used[key] == settings[key], key
        assert (used["numerics"], used["augment"]) == ("official", "official")  # the paper's run
        assert (used["model"], used["pretrained"], used["iters_per_epoch"]) == ("clipood-tiny", None, 2)
        assert f"{settings['eval_metric'].removeprefix('eval_').removesuffix('_top1')}" in {
            s.split("=", 1)[0] for s in used["eval_shards"]}  # best.pt is picked on an eval set that exists
        assert bool(used["train_shards_per_domain"]) == (table in (1, 4))  # DomainBed: balanced batches


def test_a_second_invocation_reuses_finished_runs(runs: DryRuns) -> None:
    run = runs[(2, "ImageNet")]
    (run_dir,) = run_dirs(run, 2, "ImageNet")
    stamp = (run_dir / "results.json").stat().st_mtime_ns
    again = paper.main(run["argv"])
    assert (run_dir / "results.json").stat().st_mtime_ns == stamp  # not trained again
    assert again["rows"] == run["summary"]["rows"]


def test_launcher_runs_the_recipe_as_a_subprocess(runs: DryRuns, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [*runs[(3, "EuroSAT")]["argv"], "--launcher", "python", "--output", str(tmp_path)]
    summary = paper.main(argv)
    (run_dir,) = run_dirs({"out": tmp_path}, 3, "EuroSAT")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == 2 and (run_dir / "checkpoints" / "last.pt").is_file()
    base = next(r for r in summary["rows"] if r["metric"] == "base")["ours"]
    assert base["clipood"] == pytest.approx(results["eval_bma_test_base_top1"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="--launcher 'torchrun"):
        paper.main(argv)


# ---------------------------------------------------------------------------------------------
# Few-shot batches, from the outside: paper.py's shards, the recipe's own loader


def test_few_shot_batches_from_the_driver_are_uniform_draws(tmp_path: Path) -> None:
    """Table 3 on a 100-class Caltech101 tree: the recipe's batches of 36 over the 50 base classes'
    16 shots hit as many classes as a uniform draw does, repeat no image, and take whole passes."""
    classes, shots, batch = 100, 16, 36
    folder = tmp_path / "data" / "caltech-101"
    entries: dict[str, list] = {"train": [], "val": [], "test": []}
    for label in range(classes):
        for split, n in (("train", shots + 1), ("val", 1), ("test", 1)):
            for i in range(n):
                rel = f"c{label:03d}/{split}_{i}.png"  # red = class, green = image: a batch names its samples
                path = folder / "101_ObjectCategories" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (label, i + 100 * (split != "train"), 0)).save(path)
                entries[split].append([rel, label, f"class {label}"])
    (folder / "split_zhou_Caltech101.json").write_text(json.dumps(entries))
    paper.main(["--table", "3", "--dataset", "Caltech101", "--data-root", str(tmp_path / "data"), "--output",
                str(tmp_path / "out"), "--dry-run", "--convert-workers", "1", "--no-progress"])
    (run_dir,) = run_dirs({"out": tmp_path / "out"}, 3, "Caltech101")
    argv = argv_of(run_dir)
    assert flag_values(argv, "--in-memory") == ["on"]
    first_shard = sorted(Path(flag_values(argv, "--train-shards")[0]).glob("*.tar"))[0]
    assert len({y for _, y, _ in read_shards(str(first_shard.parent))[:50]}) > 20  # shuffled before sharding

    recipe = paper.load_recipe()  # the recipe's own loader, with its defaults (2 workers) and batch 36
    args = recipe.parse_args([*argv, "--workers", "2", "--batch-size", str(batch), "--iters-per-epoch", "68"])

    def ids(images: torch.Tensor) -> list[int]:
        return (images[:, 0, 0, 0] * 1000 + images[:, 1, 0, 0]).tolist()

    to_tensor = lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).long()  # noqa: E731
    train = recipe.train_data(args, to_tensor, classes // 2, recipe.DistInfo())
    got = []
    for images, labels in train:
        assert (labels == images[:, 0, 0, 0]).all()  # base classes are the first 50: label = class
        got.append(ids(images))
    assert len(got) == 68 and all(len(set(b)) == batch for b in got)  # no image twice in a batch
    per_pass = classes // 2 * shots // batch  # 22 full batches per pass
    for p in range(68 // per_pass):
        seen = [i for b in got[p * per_pass:(p + 1) * per_pass] for i in b]
        assert len(set(seen)) == len(seen)  # no batch straddles two passes
    n, m = classes // 2 * shots, shots  # a uniform draw of 36 from 50 × 16 misses a class w.p. C(n−m, 36)/C(n, 36)
    expected = classes // 2 * (1 - math.comb(n - m, batch) / math.comb(n, batch))  # 26.24
    mean = sum(len({i // 1000 for i in b}) for b in got) / len(got)
    assert mean == pytest.approx(expected, rel=0.05)
