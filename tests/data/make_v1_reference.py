"""Writes v1_reference.safetensors: outputs of version-1 policies under the release that introduced version 2.

Runs under that earlier release (PYTHONPATH=<old>/src python tests/data/make_v1_reference.py OUT);
tests/test_estimators.py extracts the release from git history, runs this on the test machine (float
results depend on the CPU) and checks that today's code reproduces them bit for bit.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

torch.set_num_threads(1)
torch.set_grad_enabled(False)

import budcache.diffusers as bd  # noqa: E402
from budcache import CachePolicy, tinyflow  # noqa: E402

PROMPTS = ["a red circle", "two green triangles", "a small blue square in the top left"]
SEEDS = [3, 4, 5]

tf = tinyflow.load()
out = {}
for mech in ("reuse", "forecast1", "forecast2", "output"):
    pol = CachePolicy(28, (0, 1, 3, 6, 10, 15, 21, 27), meta={"mechanism": mech})
    out[f"sample_{mech}"] = tf.sample(PROMPTS, SEEDS, 28, policy=pol, mechanism=mech).latent.contiguous()
pipe = tinyflow.load_pipeline()
for mech in ("reuse", "forecast1"):
    pol = CachePolicy(28, (0, 1, 3, 6, 10, 15, 21, 27), meta={"mechanism": mech})
    bd.apply(pipe, pol)
    out[f"pipeline_{mech}"] = pipe(**tf.pipeline_inputs(PROMPTS[:1], seeds=SEEDS[:1]), num_inference_steps=28,
                                   output_type="latent").images.contiguous()
    bd.remove(pipe)
save_file(out, str(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("v1_reference.safetensors"))))
