"""Inference needs neither scipy (training's Hungarian matcher) nor pycocotools (COCO evaluation).

A fresh interpreter that cannot import either (an import hook refuses them and records every attempt)
loads a saved model, predicts with both mask formats and runs `fai-mf predict`; no attempt to import
them may happen at all, so a machine without them (a bare GPU box) runs inference exactly as here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]

INFERENCE_WITHOUT_OPTIONAL_DEPS = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    BLOCKED = ("scipy", "pycocotools")
    attempts = []

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is blocked by the test")
            return None

    sys.meta_path.insert(0, Refuse())

    import numpy as np
    import torch
    from PIL import Image

    import fai_mf
    from fai_mf import cli
    from fai_mf.demo import synthetic_image

    out = Path(sys.argv[1])
    config = fai_mf.MaskFormerConfig(**json.loads(sys.argv[2]))
    torch.manual_seed(0)
    network = fai_mf.FAIMaskFormer(config).eval()
    with torch.no_grad():
        network.pixel_decoder.mask_features.weight.mul_(40)
    model_dir = fai_mf.FAIMFModel(config, network, classes=["a", "b", "c"], name="tiny").save(out / "model")

    m = fai_mf.load_model(str(model_dir))
    image = synthetic_image(40, 56, 0)[0].round().byte().permute(1, 2, 0).numpy()
    for fmt in ("png", "rle"):
        dets = m.predict([image], threshold=0.0, mask_format=fmt)
        assert dets[0].detections, fmt
        for det in dets[0].detections:
            assert fai_mf.decode_mask(det, (40, 56)).any()
    Image.fromarray(image).save(out / "scene.png")
    assert cli.main(["predict", "--model", str(model_dir), str(out / "scene.png"), "--out", str(out / "r.json"),
                     "--threshold", "0"]) == 0
    assert json.loads((out / "r.json").read_text())["detections"]
    print(json.dumps({"attempts": attempts, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
''')


def test_inference_imports_neither_scipy_nor_pycocotools(tmp_path):
    env = {**os.environ, "MF_KERNELS": "reference"}
    config = json.dumps(tiny_config(postprocessing_type="instance").to_dict())
    done = subprocess.run([sys.executable, "-c", INFERENCE_WITHOUT_OPTIONAL_DEPS, str(tmp_path), config], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = done.stdout.strip().splitlines()[-1]
    assert report == '{"attempts": [], "loaded": []}', report
