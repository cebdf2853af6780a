"""The white-box empirical audit (``privatune canary``, the default auditor): gradient
canaries planted in a simulated federation, scored from what the server sees.

m canary directions in the trainable parameters (the adapter's tensors flattened in their
order), either distinct coordinates ("dirac") or random unit vectors ("random", which allows
m above the parameter count). Canary i belongs to one of the first ``into`` institutions and
is included with probability 1/2 (OS CSPRNG). An included canary is one more record of its
institution: in every DP step it is Poisson-sampled with the step's true sample rate and its
gradient, of norm exactly the clipping bound C, joins the clipped sum before the noise,
through whichever DP backend runs (client.dp_backends.audit_canaries: Opacus' hooks, fused,
or none). The federation, its planning and its ledgers are otherwise the run as configured;
the ledgers account the run like any other.

Each canary's gradient has a secret sign per round: +1 in two thirds of the rounds, -1 in
the rest (a record's gradient may change from step to step; DP-SGD's analysis allows any
gradient of norm at most C, so this is still one record). Why: the data's own gradient on a
canary's direction persists from round to round and, summed over rounds, drowns the canary
(measured on medical: without DP the plain sum reached 1.67 of a ceiling of 5.67); weighted
by the centred signs, that persistent part cancels while the canary adds up.

Two auditors score each canary by the inner product with its direction of:
- ``gradient_updates``: its institution's update (reply minus the global adapter it was
  sent) in each round, weighted by the canary's centred sign in that round and summed over
  the rounds the institution trained: the server's view before averaging;
- ``gradient_final``: the final global adapter minus the first one: the last iterate, where
  the signs' net third is what remains of a canary.

Three broken mechanisms (``BROKEN``) exist to show the audit's power, never for use:
the noise switched off, the noise at half the planned multiplier, and the sample rate
recorded in the ledger at half its true value (the noise planned right, the claim too
low). Each keeps the ledgers consistent with what they claim, so that `privatune audit`'s
arithmetic cannot see it.
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from privatune.client.dp_backends import audit_canaries
from privatune.common.config import RunConfig, Scalar, stored_flat
from privatune.common.model.adapter import from_record, get_trainable
from privatune.common.model.build import build_model, load_trained
from privatune.common.privacy.audit import audit
from privatune.common.privacy.audit import to_html as audit_html
from privatune.common.privacy.empirical import RESULT, audit_scores, auditor_confidence, ceiling
from privatune.common.privacy.empirical import to_html as empirical_html
from privatune.common.protocol import SERVER_ROUND
from privatune.server.report import write_report
from privatune.simulations.scenario import Scenario
from privatune.simulations.simulate import prepared_dir, resolve_flat, run_flat
from privatune.simulations.tools.canary import claimed_epsilon

KINDS = ("dirac", "random")
DENSE_LIMIT = 50_000_000  # m x d floats of random directions held at once


@dataclass(frozen=True)
class GradientCanaries:
    """The canaries and the auditor's secrets. Picklable: a client mod carries it to the
    simulation's workers."""

    holders: np.ndarray  # partition id of each canary's institution
    included: np.ndarray  # the secret bits
    clip: float  # C: each canary's gradient norm
    dim: int  # trainable coordinates
    coordinates: np.ndarray | None  # dirac: one distinct coordinate per canary
    seed: int  # random: the directions' seed
    signs: np.ndarray  # (m, rounds) of +1 / -1: each canary's sign in each round

    @classmethod
    def draw(
        cls, m: int, into: int, dim: int, clip: float, kind: str, rounds: int
    ) -> GradientCanaries:
        if kind not in KINDS:
            raise ValueError(f"canary kind {kind!r}: one of {', '.join(KINDS)}")
        if kind == "dirac" and m > dim:
            raise ValueError(f"{m} dirac canaries need {m} coordinates; the adapter has {dim}")
        if kind == "random" and m * dim > DENSE_LIMIT:
            raise ValueError(f"{m} random canaries in {dim} coordinates: too large; use dirac")
        rng = np.random.default_rng(secrets.randbits(128))  # the auditor's secret
        return cls(
            holders=np.arange(m) % into,
            included=rng.random(m) < 0.5,
            clip=clip,
            dim=dim,
            coordinates=rng.choice(dim, m, replace=False) if kind == "dirac" else None,
            seed=secrets.randbits(63),
            signs=rng.permuted(
                np.tile(np.where(np.arange(rounds) < math.ceil(2 * rounds / 3), 1, -1), (m, 1)),
                axis=1,
            ).astype(np.int8),
        )

    @property
    def m(self) -> int:
        return len(self.included)

    def directions(self) -> np.ndarray:
        """Random unit directions, (m, dim), drawn from the seed (random kind only)."""
        u = np.random.default_rng(self.seed).standard_normal((self.m, self.dim))
        return (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)

    def project(self, flat: np.ndarray) -> np.ndarray:
        """<flat, u_i> for every canary."""
        if self.coordinates is not None:
            return np.asarray(flat, dtype=np.float64)[self.coordinates]
        return self.directions().astype(np.float64) @ np.asarray(flat, dtype=np.float64)

    def sign(self, rnd: int) -> np.ndarray:
        """Each canary's sign in round ``rnd`` (1-based; +1 past the planned rounds)."""
        if not 1 <= rnd <= self.signs.shape[1]:
            return np.ones(self.m, dtype=np.int8)
        return self.signs[:, rnd - 1]

    def gradient(self, picked: np.ndarray, sign: np.ndarray) -> np.ndarray:
        """The summed gradient of the picked canaries: -C sign_i u_i each, so that a descent
        step moves the parameters along sign_i u_i."""
        out = np.zeros(self.dim, dtype=np.float32)
        if self.coordinates is not None:
            out[self.coordinates[picked]] = -self.clip * sign[picked]
        elif picked.any():
            out -= self.clip * (sign[picked, None] * self.directions()[picked]).sum(0)
        return out

    def hook(
        self, pid: int, rnd: int
    ) -> Callable[[Sequence[torch.Tensor], float], list[torch.Tensor]]:
        """The step hook of institution ``pid`` in round ``rnd`` (client.dp_backends.
        CanaryHook): each of its included canaries Poisson-sampled at the step's rate, from
        the OS CSPRNG, with its sign of the round."""
        mine = self.included & (self.holders == pid)
        sign = self.sign(rnd)
        rng = np.random.default_rng(secrets.randbits(128))

        def canaries(params: Sequence[torch.Tensor], rate: float) -> list[torch.Tensor]:
            sizes = [p.numel() for p in params]
            if sum(sizes) != self.dim:
                raise RuntimeError(f"canaries span {self.dim} coordinates, the step {sum(sizes)}")
            flat = torch.from_numpy(self.gradient(mine & (rng.random(self.m) < rate), sign))
            return [
                part.view_as(p).to(p.device, torch.float32)
                for part, p in zip(flat.split(sizes), params, strict=True)
            ]

        return canaries


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The adapter's tensors as one vector, in their order (the canaries' coordinates)."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def plant(canaries: GradientCanaries, folder: Path) -> Mod:
    """A client mod that trains each institution with its canaries and keeps, per round,
    the projections of its update (reply minus the global adapter sent) on every canary
    direction, and those of the first global adapter."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        pid = int(context.node_config.get("partition-id", -1))
        rnd = int(msg.content["config"][SERVER_ROUND])
        start = flatten(from_record(msg.content["arrays"]))
        with audit_canaries(canaries.hook(pid, rnd)):
            reply = call_next(msg, context)
        folder.mkdir(parents=True, exist_ok=True)
        if rnd == 1:
            np.save(folder / "start.npy", canaries.project(start))
        if reply.has_content() and "arrays" in reply.content and pid in canaries.holders:
            update = flatten(from_record(reply.content["arrays"])) - start
            np.save(folder / f"p{pid:03d}-round-{rnd:03d}.npy", canaries.project(update))
        return reply

    return mod


def scores(canaries: GradientCanaries, folder: Path, final: np.ndarray) -> dict[str, np.ndarray]:
    """Each canary's two scores: its institution's updates weighted by the canary's signs,
    centred over the rounds the institution trained (so that what persists cancels), and
    the last iterate's move (``final``: the final adapter, flattened) on its direction."""
    summed = np.zeros(canaries.m)
    for pid in np.unique(canaries.holders):
        mine = canaries.holders == pid
        kept = sorted(folder.glob(f"p{pid:03d}-round-*.npy"))
        if not kept:
            raise RuntimeError(f"{folder}: no update of partition {pid} was kept")
        rounds = [int(f.stem.rsplit("-", 1)[1]) for f in kept]
        signs = np.stack([canaries.sign(r) for r in rounds], axis=1).astype(float)
        weights = signs - signs.mean(axis=1, keepdims=True)
        if len(rounds) == 1:  # nothing to centre over
            weights = signs
        updates = np.stack([np.load(f) for f in kept], axis=1)
        summed[mine] = (weights * updates).sum(axis=1)[mine]
    moved = canaries.project(final) - np.load(folder / "start.npy")
    return {"gradient_updates": summed, "gradient_final": moved}


# ---- broken mechanisms: the audit's power, shown; each a client mod -------------------------


@contextmanager
def _noise_scaled(factor: float) -> Iterator[None]:
    """DP noise drawn at ``factor`` times its std in both backends, while everything else
    (plan, accountant, ledger) records the planned multiplier."""
    import opacus.optimizers.optimizer as dp_optimizer
    import privatune.client.fused_clipping as fused

    real_noise, real_torch = dp_optimizer._generate_noise, fused.torch

    def scaled_noise(std, reference, *args, **kwargs):
        return real_noise(std * factor, reference, *args, **kwargs)

    class ScaledTorch:  # fused_clipping's module-level torch, normal() scaled
        def __getattr__(self, name: str):
            return getattr(real_torch, name)

        @staticmethod
        def normal(mean, std, *args, **kwargs):
            return real_torch.normal(mean, std * factor, *args, **kwargs)

    with (
        mock.patch.object(dp_optimizer, "_generate_noise", scaled_noise),
        mock.patch.object(fused, "torch", ScaledTorch()),
    ):
        yield


@contextmanager
def _rate_reported_half() -> Iterator[None]:
    """The noise planned for the true sample rate, but the rate the ledger records (and
    that the accountant and the ledger's plan check see) is half the one the loader
    really samples with: a ledger that claims less than was spent, and agrees with itself."""
    import privatune.client.app as client_app
    from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

    real_rate, real_noise_for = client_app.sample_rate, client_app.noise_for

    def noise_for_true_rate(*args, **kwargs):
        with mock.patch.object(client_app, "sample_rate", real_rate):
            return real_noise_for(*args, **kwargs)

    patches = [
        mock.patch.object(client_app, "sample_rate", lambda n, b: real_rate(n, b) / 2),
        mock.patch.object(client_app, "noise_for", noise_for_true_rate),
    ]
    for cls in (RDPAccountant, PRVAccountant, GaussianAccountant):
        real_step = cls.step

        def half_step(self, *, noise_multiplier, sample_rate, _step=real_step):
            return _step(self, noise_multiplier=noise_multiplier, sample_rate=sample_rate / 2)

        patches.append(mock.patch.object(cls, "step", half_step))
    for p in patches:
        p.start()
    try:
        yield
    finally:
        for p in reversed(patches):
            p.stop()


BROKEN: dict[str, Callable[[], object]] = {
    "noise-off": lambda: _noise_scaled(0.0),
    "half-noise": lambda: _noise_scaled(0.5),
    "half-rate": _rate_reported_half,
}


def broken(name: str) -> Mod:
    """A client mod that trains under the named broken mechanism (``BROKEN``)."""
    if name not in BROKEN:
        raise ValueError(f"broken mechanism {name!r}: one of {', '.join(BROKEN)}")

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        with BROKEN[name]():  # type: ignore[attr-defined]
            return call_next(msg, context)

    return mod


# ---- the audit ----------------------------------------------------------------------------


def run_gradient_audit(
    scenario: Scenario,
    overrides: Mapping[str, Scalar] | None = None,
    canaries: int = 1000,
    into: int = 8,
    confidence: float = 0.95,
    kind: str = "dirac",
    break_: str | None = None,
) -> Path:
    """Plant gradient canaries, run the federation as configured (``break_``: under one of
    ``BROKEN``), score, bound; the result JSON and the report land in the run folder."""
    flat = resolve_flat(scenario, overrides)
    data_dir = prepared_dir(scenario, flat)
    cfg = RunConfig.from_flat(flat)
    names = json.loads((data_dir / "manifest.json").read_text())["institutions"][:into]
    dim = sum(a.size for a in get_trainable(build_model(cfg, torch.device("cpu"))).values())
    planted = GradientCanaries.draw(
        canaries, len(names), dim, cfg.dp.max_grad_norm, kind, cfg.federation.rounds
    )
    base = Path(cfg.run.output_dir) / cfg.run.name
    kept = base.parent / f"{cfg.run.name}-gradient-canaries"
    shutil.rmtree(kept, ignore_errors=True)
    mods = [plant(planted, kept), *([broken(break_)] if break_ else [])]
    run_dir = run_flat(flat, scenario.institutions, mods)
    cfg = RunConfig.from_flat(stored_flat(run_dir))
    final = flatten(get_trainable(load_trained(run_dir, torch.device("cpu"))))
    np.savez(kept / "secrets.npz", **{k: v for k, v in asdict(planted).items() if v is not None})
    each = auditor_confidence(confidence, 2)
    claimed = claimed_epsilon(run_dir, names)
    result = {
        "auditor": "white-box gradient canaries",
        "kind": kind,
        "canaries": canaries,
        "into": names,
        "confidence": confidence,
        "broken": break_,
        "claimed_epsilon": claimed if math.isfinite(claimed) else None,  # None: no DP
        "ceiling": ceiling(canaries, cfg.dp.delta, each),
        **{
            key: asdict(audit_scores(s, planted.included, cfg.dp.delta, each))
            for key, s in scores(planted, kept, final).items()
        },
    }
    (run_dir / RESULT).write_text(json.dumps(result, indent=2))
    write_report(run_dir, [audit_html(audit(run_dir)), empirical_html(result)])
    return run_dir
