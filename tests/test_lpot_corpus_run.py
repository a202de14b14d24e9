"""One of Intel's own LPOT configuration files run end to end by ``lpot-ray tune``: its
dataloaders, transforms and metric as written, only its paths pointed at a small model and
image folder made here (and the trials capped, so it runs in seconds). The corpus lives beside
the project, not in it; a clone without it skips this test."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli_helpers import run_cli

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "lpot-yaml" / "corpus"
CONF = CORPUS / "pytorch__imagenet-cpu-ptq__conf.yaml"
pytestmark = pytest.mark.skipif(not CONF.is_file(), reason=f"the LPOT YAML corpus is not at {CORPUS}")


def image_folder(root: Path, per_class: int = 5) -> Path:
    """ImageNet's layout in miniature: dark images of class 0, bright ones of class 1, with noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, level in (("n00000000", 40), ("n00000001", 210)):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.clip(level + rng.normal(0, 12, size=(24, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.JPEG", quality=95)
    return root


def brightness_model(path: Path) -> Path:
    """A small CNN that tells the two classes apart by brightness, with a wide margin, as .pt2."""
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1 / 27)
        model[0].bias.zero_()
        model[3].weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
        model[3].bias.zero_()
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(model.eval(), (torch.zeros(2, 3, 224, 224),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(path))
    return path


def pointed_at(conf: dict, model: Path, images: Path, workspace: Path) -> dict:
    """The corpus configuration with its paths replaced, the trials capped, one in-process worker."""
    conf["model"]["path"] = str(model)
    for section in (conf["quantization"]["calibration"], conf["evaluation"]["accuracy"], conf["evaluation"]["performance"]):
        section["dataloader"]["dataset"]["ImageFolder"]["root"] = str(images)
    conf["tuning"]["exit_policy"]["max_trials"] = 3
    conf["tuning"]["workspace"] = {"path": str(workspace)}
    conf["ray"] = {"workers": 1}
    return conf


def test_lpots_pytorch_imagenet_config_tunes_end_to_end(tmp_path):
    original = yaml.safe_load(CONF.read_text())
    calibration = original["quantization"]["calibration"]["dataloader"]["transform"]
    assert {"RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"} <= set(calibration)
    conf = pointed_at(original, brightness_model(tmp_path / "model.pt2"), image_folder(tmp_path / "images"), tmp_path / "ws")
    (tmp_path / "conf.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))  # transforms run in YAML order
    done = run_cli("tune", str(tmp_path / "conf.yaml"), timeout=540)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert "passed" in done.stdout and "1.0000 (baseline)" in done.stdout  # the whole folder, classified right
    rows = json.loads(run_cli("history", str(tmp_path / "ws"), "--json", timeout=120).stdout)
    (chosen,) = [row for row in rows if row["chosen"]]
    assert chosen["passed"] and chosen["accuracy"] == pytest.approx(1.0)
    assert (tmp_path / "ws" / "int8_model" / "model.pt2").is_file()


PRUNE_CONF = CORPUS / "pytorch__imagenet-prune__conf.yaml"


def resnet_named_model(path: Path) -> Path:
    """A small CNN whose weights bear the names LPOT's ResNet pruning config prunes
    (``layer1.0.conv1.weight``, ``layer1.0.conv2.weight``), trainable, as .pt2."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=4)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv2(torch.relu(self.conv1(x))))

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("layer1", torch.nn.Sequential(Block()))
    model.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", torch.nn.Flatten())
    model.add_module("fc", torch.nn.Linear(8, 2))
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(model.eval(), (torch.zeros(2, 3, 224, 224),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(path))
    return path


@pytest.mark.skipif(not PRUNE_CONF.is_file(), reason=f"the LPOT YAML corpus is not at {CORPUS}")
def test_lpots_pytorch_pruning_config_prunes_end_to_end(tmp_path):
    """LPOT's ImageNet pruning example as written (two basic_magnitude pruners on their own
    schedules, SGD, CrossEntropyLoss(sum), its transforms), its folders and model replaced. The
    sparsities are LPOT's schedule over the four training epochs 0-3: the first pruner
    (epochs 1-3) reaches its 0.97; the second (epochs 0-4, every 2) stops at 2/4 of 0.6."""
    import torch

    conf = yaml.load(PRUNE_CONF.read_text(), Loader=_LpotLoader)
    conf["model"]["path"] = str(resnet_named_model(tmp_path / "model.pt2"))
    images = image_folder(tmp_path / "images", per_class=4)
    for section in (conf["pruning"]["train"], conf["evaluation"]["accuracy"]):
        section["dataloader"]["dataset"]["ImageFolder"]["root"] = str(images)
    conf["tuning"]["workspace"] = {"path": str(tmp_path / "ws")}
    (tmp_path / "conf.yaml").write_text(yaml.dump(conf, Dumper=_LpotDumper, sort_keys=False))
    done = run_cli("prune", str(tmp_path / "conf.yaml"), timeout=300)
    assert done.returncode in (0, 1), (done.stdout[-2000:], done.stderr[-2000:])
    # round(216 x 0.97) = 210 of conv1's 216 weights; round(576 x 0.3) = 173 of conv2's 576
    assert "layer1.0.conv1.weight: 97.2% zeros" in done.stdout and "layer1.0.conv2.weight: 30.0% zeros" in done.stdout
    pruned = torch.export.load(str(tmp_path / "ws" / "pruned" / "model.pt2")).module()
    weights = dict(pruned.named_parameters())
    assert int((weights["layer1.0.conv1.weight"] == 0).sum()) == 210
    assert (weights["fc.weight"] != 0).all()


class _LpotLoader(yaml.SafeLoader):
    """Reads LPOT's ``!Pruner`` entries as mappings that remember their tag."""


class _Pruner(dict):
    pass


class _LpotDumper(yaml.SafeDumper):
    pass


_LpotLoader.add_constructor("!Pruner", lambda loader, node: _Pruner(loader.construct_mapping(node, deep=True)))
_LpotDumper.add_representer(_Pruner, lambda dumper, value: dumper.represent_mapping("!Pruner", dict(value)))
