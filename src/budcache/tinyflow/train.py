"""Train tinyflow with rectified flow on images rendered from the prompt grammar.

Loss: ``E || v_theta(x_s, s, c) - (eps - x_0) ||^2`` with ``x_s = (1-s) x_0 + s eps``,
``s`` logit-normal then shifted like FLUX's schedule at 64 tokens. The
transformer and the text encoder are trained jointly; an exponential moving
average of both is what ships. Ten percent of prompts are empty (the "empty"
template), so classifier-free guidance works.

Seeded and resumable: batch ``i`` is drawn from ``(seed, i)`` alone, and the
checkpoint (safetensors + JSON, written atomically) holds weights, EMA and
optimiser state, so a resumed run continues exactly where the last one stopped.
A new run can also start from exported weights (``--init DIR``, e.g. the
shipped ones) with a fresh optimiser: training then carries on across machines
that kept no checkpoint, from whatever weights the package ships.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import ConfigError
from . import checker, grammar, load
from .model import TinyTextEncoder, image_ids, image_to_latent, latent_to_image, new_transformer, text_ids
from .render import render_params, scene_params

#: FLUX's time shift at 64 image tokens: exp(mu), mu = 0.5 + (64 - 256) * 0.65 / 3840.
TRAIN_SHIFT = math.exp(0.5 + (64 - 256) * (1.15 - 0.5) / (4096 - 256))


@dataclass
class TrainConfig:
    """Hyper-parameters of a tinyflow training run."""

    iters: int = 40_000
    batch: int = 256
    lr: float = 5e-4
    min_lr_frac: float = 0.05
    warmup: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    seed: int = 0
    workers: int = 0
    #: Weights directory (the shipped layout: ``transformer/`` and ``text_encoder/``) that a new run starts
    #: from instead of a random init, e.g. the package's own weights; "" starts from scratch.
    init: str = ""
    #: Relative weights of the one-object, two-object and count templates among the non-empty
    #: prompts (the empty prompt stays at 10% of every batch, for classifier-free guidance).
    mix_single: float = 0.45
    mix_pair: float = 0.25
    mix_count: float = 0.20
    #: Depth of the text encoder (width stays the transformer's ``joint_attention_dim``).
    text_layers: int = 2
    #: What ``init`` loads: "all" (transformer and text encoder) or "transformer" (a new text encoder,
    #: e.g. a deeper one, trains from scratch next to the initialised transformer).
    init_parts: str = "all"
    #: Width of the text encoder's causal word convolution (0: none, the encoder shipped before it).
    #: With ``init``, a kernel the initial weights lack starts at zero, so training starts from them.
    text_kernel: int = 3
    #: Width of the text encoder's look-ahead convolution over the words after each word (0: none, the
    #: encoder shipped before it), so an adjective's state carries its shape. Starts at zero, like
    #: ``text_kernel``.
    text_lookahead: int = 2
    #: Layout of two-object training scenes (:data:`grammar.PAIR_LAYOUTS`): "ordered" draws the
    #: first-named object left of the second, "free" anywhere (the data of runs before the option).
    pair_layout: str = "ordered"

    def template_mix(self) -> grammar.TemplateMix:
        """The prompt mix of training batches: 10% empty, the rest split by the ``mix_*`` weights."""
        w = (self.mix_single, self.mix_pair, self.mix_count)
        if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(f"mix_single, mix_pair and mix_count must be finite, >= 0 and not all 0 (got {w})")
        k = 0.9 / sum(w)
        return grammar.TemplateMix(empty=0.1, single=w[0] * k, pair=w[1] * k, count=w[2] * k)


#: Fields whose default changed after checkpoints were written without them: the value those runs used.
_BEFORE_FIELD = {"text_kernel": 0, "text_lookahead": 0, "pair_layout": "free"}


class _Batches(IterableDataset):
    """Deterministic stream of (token ids, scene params); batch i depends on (seed, i) only."""

    def __init__(self, start: int, stop: int, batch: int, seed: int,
                 mix: grammar.TemplateMix = grammar.TemplateMix(), pair_layout: str = "ordered") -> None:
        self.start, self.stop, self.batch, self.seed, self.mix = start, stop, batch, seed, mix
        self.pair_layout = pair_layout

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for i in range(self.start + wid, self.stop, nw):
            yield make_batch(self.batch, self.seed, i, self.mix, self.pair_layout)


def make_batch(batch: int, seed: int, index: int, mix: grammar.TemplateMix = grammar.TemplateMix(),
               pair_layout: str = "ordered") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and packed scene parameters (B, M, 6) of training batch ``index``."""
    rng = np.random.default_rng([seed, index])
    specs = [grammar.sample_spec(rng, mix) for _ in range(batch)]
    scenes = [grammar.realise(s, rng, pair_layout=pair_layout) for s in specs]
    ids = torch.from_numpy(grammar.tokenize([grammar.prompt_of(s) for s in specs]))
    return ids, scene_params(scenes)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.iters - cfg.warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def _optim_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optim_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, step: int, cfg: TrainConfig, models: dict[str, torch.nn.Module],
                    opt: torch.optim.Optimizer, log: list[dict]) -> None:
    """Write the checkpoint directory atomically (temp dir, then rename)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / "state.json").exists():
        raise ConfigError(f"{path} exists and is not a tinyflow checkpoint; choose another --out")
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, m in models.items():
        m.save_pretrained(tmp / name, safe_serialization=True)
    tensors, meta = _optim_state(opt)
    # Split the optimiser moments so each file stays small.
    for part in ("exp_avg", "exp_avg_sq"):
        save_file({k: v for k, v in tensors.items() if k.endswith(part)}, str(tmp / f"optim_{part}.safetensors"))
    rest = {k: v for k, v in tensors.items() if not k.endswith(("exp_avg", "exp_avg_sq"))}
    save_file(rest or {"_": torch.zeros(1)}, str(tmp / "optim_other.safetensors"))
    (tmp / "state.json").write_text(json.dumps(
        {"step": step, "config": asdict(cfg), "optim": meta, "log": log}, indent=1))
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def export_weights(ckpt: Path, dest: Path) -> None:
    """Copy the EMA transformer and text encoder of a checkpoint to ``dest`` (the shipped layout)."""
    dest = Path(dest)
    for src, dst in (("transformer_ema", "transformer"), ("text_encoder_ema", "text_encoder")):
        target = dest / dst
        tmp = target.with_name(dst + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(Path(ckpt) / src, tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)


def _load_init(path: Path, models: dict[str, torch.nn.Module], text_encoder: bool = True) -> None:
    """Load exported weights (``path/transformer``, ``path/text_encoder``) into the models and their EMAs."""
    parts = [("transformer", ("transformer", "transformer_ema"))]
    if text_encoder:
        parts.append(("text_encoder", ("text_encoder", "text_encoder_ema")))
    for sub, names in parts:
        f = path / sub / "diffusion_pytorch_model.safetensors"
        if not f.is_file():
            raise ConfigError(f"--init {path}: no {sub}/diffusion_pytorch_model.safetensors there "
                              "(expected the layout that --export writes)")
        sd = load_file(str(f))
        if sub == "text_encoder":
            for key, field, flag, what in (("local.weight", "local_kernel", "--text-kernel", "word convolution"),
                                           ("ahead.weight", "lookahead", "--text-lookahead",
                                            "look-ahead convolution")):
                have = sd[key].shape[-1] if key in sd else 0
                want = getattr(models["text_encoder"].config, field)
                if have and have != want:
                    raise ConfigError(f"--init {path}: its text encoder has a {what} of width {have}, "
                                      f"this run's has {want or 'none'}; pass {flag} {have}")
        for name in names:
            missing, unexpected = models[name].load_state_dict(sd, strict=False)
            # A word convolution the initial encoder lacks keeps its zero init (the loaded encoder's output).
            missing = [k for k in missing if not (sub == "text_encoder" and k.startswith(("local.", "ahead.")))]
            if missing or unexpected:
                raise ConfigError(f"--init {path}: {sub} weights do not fit tinyflow's architecture "
                                  f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def train(out: str | Path, cfg: TrainConfig, *, device: str = "cpu", minutes: float | None = None,
          log_every: int = 100, save_every_s: float = 300.0, progress: bool = True,
          compile: bool = False, stop_at: int | None = None) -> Path:
    """Train (or resume) tinyflow into checkpoint dir ``out``; stops after ``iters`` or ``minutes``.

    ``stop_at = n`` stops (and checkpoints) at step ``n`` of the ``iters``-step schedule, exactly
    where that run would be at step ``n``; resuming without it carries on to ``iters``.

    ``compile`` runs the transformer through ``torch.compile`` (1.26x faster per step on the 2-core
    CPU machine; the weights and checkpoints are those of the plain module).
    """
    if cfg.batch < 1 or cfg.iters < 1:
        raise ConfigError(f"batch and iters must be >= 1 (got batch={cfg.batch}, iters={cfg.iters})")
    if stop_at is not None and stop_at < 1:
        raise ConfigError(f"stop_at must be >= 1 (got {stop_at})")
    if cfg.text_layers < 1:
        raise ConfigError(f"text_layers must be >= 1 (got {cfg.text_layers})")
    if cfg.init_parts not in ("all", "transformer"):
        raise ConfigError(f"init_parts must be 'all' or 'transformer' (got {cfg.init_parts!r})")
    if cfg.text_kernel < 0:
        raise ConfigError(f"text_kernel must be >= 0 (got {cfg.text_kernel})")
    if cfg.text_lookahead < 0:
        raise ConfigError(f"text_lookahead must be >= 0 (got {cfg.text_lookahead})")
    if cfg.pair_layout not in grammar.PAIR_LAYOUTS:
        raise ConfigError(f"pair_layout must be one of {grammar.PAIR_LAYOUTS} (got {cfg.pair_layout!r})")
    mix = cfg.template_mix()
    out = Path(out)
    torch.manual_seed(cfg.seed)
    enc = dict(layers=cfg.text_layers, local_kernel=cfg.text_kernel, lookahead=cfg.text_lookahead)
    transformer, encoder = new_transformer(), TinyTextEncoder(**enc)
    ema_t, ema_e = new_transformer(), TinyTextEncoder(**enc)
    ema_t.load_state_dict(transformer.state_dict())
    ema_e.load_state_dict(encoder.state_dict())
    models = {"transformer": transformer, "text_encoder": encoder,
              "transformer_ema": ema_t, "text_encoder_ema": ema_e}
    for m in models.values():
        m.to(device)
    params = list(transformer.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay,
                            fused=str(device).startswith("cuda"))
    step, log = 0, []
    old = out.with_name(out.name + ".old")
    if not out.exists() and (old / "state.json").exists():
        os.replace(old, out)  # a save was interrupted between its two renames: the previous checkpoint is intact
    if out.exists() and any(out.iterdir()) and not (out / "state.json").exists():
        raise ConfigError(f"{out} exists and is not a tinyflow checkpoint; choose another --out")
    if (out / "state.json").exists():
        state = json.loads((out / "state.json").read_text())
        # Fields newer than the checkpoint take the value the run used (the default, or _BEFORE_FIELD);
        # init: first run only.
        made = {**asdict(TrainConfig()), **_BEFORE_FIELD, **state["config"], "workers": cfg.workers,
                "init": cfg.init}
        if made != asdict(cfg):
            diff = ", ".join(f"--{k.replace('_', '-')} {made[k]!r} (not {v!r})"
                             for k, v in asdict(cfg).items() if made[k] != v)
            raise ConfigError(f"checkpoint {out} was made with config {state['config']}; to resume it pass {diff}")
        for name, m in models.items():
            sd = load_file(str(out / name / "diffusion_pytorch_model.safetensors"), device=str(device))
            m.load_state_dict(sd)
        tensors = {}
        for part in ("exp_avg", "exp_avg_sq", "other"):
            tensors.update(load_file(str(out / f"optim_{part}.safetensors"), device=str(device)))
        tensors.pop("_", None)
        _load_optim_state(opt, tensors, state["optim"])
        step, log = state["step"], state["log"]
        print(f"resumed from {out} at step {step}", flush=True)
    elif cfg.init:  # a new run only: a resumed one has its weights from the checkpoint
        _load_init(Path(cfg.init), models, text_encoder=cfg.init_parts == "all")
    end = cfg.iters if stop_at is None else min(cfg.iters, stop_at)
    if step >= end:
        return out

    img_ids, txt_ids = image_ids(device=device), text_ids(device=device)
    loader = DataLoader(_Batches(step, cfg.iters, cfg.batch, cfg.seed, mix, cfg.pair_layout), batch_size=None,
                        num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None,
                        persistent_workers=False)
    t0 = last_save = time.time()
    gen = torch.Generator(device=device)
    running, n_running = 0.0, 0
    pbar = None
    if progress:
        from tqdm import tqdm
        pbar = tqdm(total=cfg.iters, initial=step, desc="tinyflow", dynamic_ncols=True)
    transformer.train()
    encoder.train()
    forward = torch.compile(transformer) if compile else transformer
    for ids, sp in loader:
        ids, sp = ids.to(device, non_blocking=True), sp.to(device, non_blocking=True)
        x0 = image_to_latent(render_params(sp) * 2 - 1)  # (B, 64, 48)
        gen.manual_seed(cfg.seed * 1_000_003 + step)
        b = x0.shape[0]
        u = torch.sigmoid(torch.randn(b, device=device, generator=gen))
        s = TRAIN_SHIFT * u / (1 + (TRAIN_SHIFT - 1) * u)  # (B,)
        eps = torch.randn(x0.shape, device=device, generator=gen)
        xs = (1 - s)[:, None, None] * x0 + s[:, None, None] * eps
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        tok, pooled = encoder(ids)
        v = forward(hidden_states=xs, encoder_hidden_states=tok, pooled_projections=pooled, timestep=s,
                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early averages forget the init
        _ema_update(ema_t, transformer, decay)
        _ema_update(ema_e, encoder, decay)
        step += 1
        running += float(loss.detach())
        n_running += 1
        if pbar is not None:
            pbar.update(1)
        if step % log_every == 0:
            entry = {"step": step, "loss": running / max(1, n_running), "elapsed_s": time.time() - t0,
                     "lr": _lr_at(cfg, step)}
            log.append(entry)
            running, n_running = 0.0, 0
            if pbar is not None:
                pbar.set_postfix(loss=f"{entry['loss']:.4f}")
            else:
                print(json.dumps(entry), flush=True)
        done = step >= end or (minutes is not None and time.time() - t0 > minutes * 60)
        if done or time.time() - last_save > save_every_s:
            save_checkpoint(out, step, cfg, models, opt, log)
            last_save = time.time()
        if done:
            break
    if pbar is not None:
        pbar.close()
    return out


@torch.no_grad()
def monitor(ckpt: str | Path, n: int = 256, steps: int = 28, device: str = "cpu", batch: int = 256,
            guidance: float = 1.0) -> dict[str, float]:
    """Checker accuracy of the EMA weights on ``n`` held-out pairs (plain Euler, FLUX schedule)."""

    tf = load(ckpt, device, subfolders=("transformer_ema", "text_encoder_ema"))
    t, e = tf.transformer, tf.text_encoder
    pairs = grammar.heldout_pairs(n)
    sig = torch.linspace(1.0, 1.0 / steps, steps)
    sig = TRAIN_SHIFT * sig / (1 + (TRAIN_SHIFT - 1) * sig)
    sig = torch.cat([sig, torch.zeros(1)]).to(device)
    ok = []
    for i in range(0, n, batch):
        chunk = pairs[i:i + batch]
        prompts = [p for p, _ in chunk]
        tok, pooled = e(torch.from_numpy(grammar.tokenize(prompts)).to(device))
        utok, upooled = e(torch.from_numpy(grammar.tokenize([""] * len(chunk))).to(device))
        x = torch.stack([torch.randn(64, 48, generator=torch.Generator().manual_seed(sd))
                         for _, sd in chunk]).to(device)
        for k in range(steps):
            ts = sig[k].expand(len(chunk))
            v = t(hidden_states=x, encoder_hidden_states=tok, pooled_projections=pooled, timestep=ts,
                  img_ids=image_ids(device=device), txt_ids=text_ids(device=device), return_dict=False)[0]
            if guidance != 1.0:
                vu = t(hidden_states=x, encoder_hidden_states=utok, pooled_projections=upooled, timestep=ts,
                       img_ids=image_ids(device=device), txt_ids=text_ids(device=device), return_dict=False)[0]
                v = vu + guidance * (v - vu)
            x = x + (sig[k + 1] - sig[k]) * v
        imgs = ((latent_to_image(x.float().cpu()) + 1) / 2).clamp(0, 1)
        ok += [checker.check(p, im).ok for p, im in zip(prompts, imgs)]
    specs = [grammar.parse_prompt(p) for p, _ in pairs]
    res = {"accuracy": float(np.mean(ok))}
    for tmpl in ("single", "pair", "count"):
        sel = [o for o, s in zip(ok, specs) if s.template == tmpl]
        res[tmpl] = float(np.mean(sel)) if sel else float("nan")
    full = [o for o, s in zip(ok, specs) if s.fully_specified]
    res["fully_specified"] = float(np.mean(full)) if full else float("nan")
    return res


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m budcache.tinyflow.train --out DIR [--minutes M] ...``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="checkpoint directory (resumed if it exists)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop (and checkpoint) at this step of the --iters schedule; rerun without it to go on")
    ap.add_argument("--export", default=None, help="copy the EMA weights here when done")
    ap.add_argument("--eval", type=int, default=0, help="held-out pairs to check when done")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer (faster steps)")
    for f, v in asdict(TrainConfig()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    a = ap.parse_args(argv)
    cfg = TrainConfig(**{f: getattr(a, f) for f in asdict(TrainConfig())})
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    train(a.out, cfg, device=a.device, minutes=a.minutes, progress=False, log_every=a.log_every,
          compile=a.compile, stop_at=a.stop_at)
    if a.export:
        export_weights(Path(a.out), Path(a.export))
    if a.eval:
        print(json.dumps(monitor(a.out, n=a.eval, device=a.device, guidance=a.guidance)), flush=True)


if __name__ == "__main__":
    main()
