"""The ClientApp: one institution's side of a round.

train: load the global adapter into a fresh local model, check the request against this
institution's own policy and its lifetime budget under the ledger's lock (fail closed), run
DP-SGD on local data, append the release to the signed ledger, reply with the trainable
tensors and only the values the threat model (docs/threat-model.md) lists.
evaluate: off unless the institution sets ``local-eval-noise``; then a noised confusion
matrix of the global adapter on the local evaluation split, accounted in the same ledger.
A bad data file or config becomes an error reply with one line that names the file and field
(never a row, a label value or a count); the full message stays in the node's own log.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch.utils.data import TensorDataset

from client.institution import Institution, Policy
from client.secure_aggregation import secure_aggregation_mod
from client.train import os_seed, train_round
from common.adapter import (
    adapter_fingerprint,
    fit_rank,
    from_record,
    get_trainable,
    set_trainable,
    to_record,
)
from common.config import ConfigError, RunConfig, Scalar
from common.data import DataError, LabeledText, load_labeled, split_local
from common.errors import PrivatuneError
from common.evaluation import noised_confusion
from common.features import cached_embed
from common.ledger import NOISE_FROM_OS, Ledger, LedgerError, spent
from common.model import build_model, encode, pick_device
from common.privacy import (
    Mechanism,
    epsilon,
    evaluation_release,
    plan,
    sample_rate,
    steps_per_epoch,
)
from common.protocol import (
    CONFUSION,
    DELTA,
    EPSILON,
    EVALUATED,
    INSTITUTION,
    LEDGER_HEAD,
    LEDGER_RECORDS,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    REFUSED,
    RUN_NAME,
    SERVER_ROUND,
    STEPS,
    TRAIN_LOSS,
)

log = logging.getLogger("flwr")
CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
EVALUATION = "gaussian (noised confusion matrix, L2 sensitivity 1)"


@functools.lru_cache(maxsize=32)
def _local_split(
    path: Path,
    text_col: str,
    label_col: str,
    labels: tuple[str, ...],
    frac: float,
    encoding: str = "utf-8",
) -> tuple[LabeledText, LabeledText, LabeledText]:
    full = load_labeled(path, text_col, label_col, list(labels), encoding)
    return (full, *split_local(full, frac))


def local_data(site: Institution, cfg: RunConfig) -> tuple[LabeledText, LabeledText, LabeledText]:
    """(full, train, eval) of the institution's file; read once per process."""
    return _local_split(
        site.data_path,
        site.text_column,
        site.label_column,
        tuple(cfg.data.label_names),
        cfg.data.eval_fraction,
        site.encoding,
    )


_INPUTS: dict[tuple, TensorDataset] = {}


def model_input(cfg: RunConfig, data: LabeledText, part: str) -> TensorDataset:
    """A local split as the model's input: token ids, or (``train.trainable = "head"``) the
    frozen encoder's pooled embeddings, which no round changes (kept in the node's disk
    cache, common.features). Kept per process, keyed by the data and by everything in the
    config that shapes them."""
    key = (
        data.path,
        data.fingerprint,
        part,
        cfg.data.eval_fraction,
        tuple(cfg.data.label_names),
        cfg.model,
        cfg.train.trainable,
    )
    if key not in _INPUTS:
        if len(_INPUTS) >= 32:
            _INPUTS.pop(next(iter(_INPUTS)))
        if cfg.train.trainable == "head":
            _INPUTS[key] = cached_embed(build_model(cfg, pick_device()), data, cfg)
        else:
            _INPUTS[key] = encode(data, cfg)
    return _INPUTS[key]


def noise_for(cfg: RunConfig, policy: Policy, num_train: int) -> float:
    """The configured noise multiplier, or one planned so that taking part in every round of
    the run (with its local evaluation, when the institution releases one) spends exactly
    ``dp.target-epsilon``."""
    if cfg.dp.noise_multiplier > 0:
        return cfg.dp.noise_multiplier
    return plan(
        cfg.dp.target_epsilon,
        cfg.dp.delta,
        cfg.federation.rounds,
        cfg.train.local_epochs,
        sample_rate(num_train, cfg.train.batch_size),
        cfg.dp.accountant,
        eval_noise=policy.local_eval_noise,
    ).noise_multiplier


def check_request(cfg: RunConfig, policy: Policy, who: str, num_train: int | None = None) -> None:
    """What the run asks against what the institution allows; one line on refusal."""
    if cfg.dp.delta > policy.max_delta:
        raise ConfigError(
            f"{who}: dp.delta {cfg.dp.delta:g} exceeds max-delta {policy.max_delta:g}"
        )
    if num_train is not None and cfg.dp.delta >= 1 / num_train:
        raise ConfigError(
            f"{who}: dp.delta {cfg.dp.delta:g} must be below 1/n of the training rows"
        )
    if cfg.dp.accountant not in policy.accountants:
        raise ConfigError(
            f"{who}: dp.accountant {cfg.dp.accountant!r} is not one this institution accepts "
            f"({', '.join(policy.accountants)})"
        )
    if not cfg.dp.enabled and not policy.allow_non_private:
        raise ConfigError(f"{who}: dp.enabled = false, and this institution requires DP")


def _ledger(site: Institution):
    """The institution's ledger under its lock; a simulation creates it on first use."""
    return Ledger.locked(
        site.ledger_path, site.signing_key, create_for=site.name if site.simulated else ""
    )


def _record_fields(site: Institution, cfg: RunConfig, run_name: str, rnd: int, full) -> dict:
    seeded = site.policy.insecure_seed is not None
    return {
        "institution": site.name,
        "run_id": run_name,
        "round": rnd,
        "time": _now(),
        "max_grad_norm": cfg.dp.max_grad_norm,
        "delta": cfg.dp.delta,
        "accountant": cfg.dp.accountant,
        "max_epsilon": site.policy.max_epsilon,
        "noise_source": "fixed seed (testing)" if seeded else NOISE_FROM_OS,
        "data_fingerprint": full.fingerprint,
    }


def _train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    config = msg.content["config"]
    run_name, server_round = str(config[RUN_NAME]), int(config[SERVER_ROUND])
    site = Institution.from_context(context, cfg, run_name)
    policy = site.policy
    full, train_set, _ = local_data(site, cfg)
    check_request(cfg, policy, site.name, len(train_set))
    with _ledger(site) as ledger:
        if ledger.institution != site.name:
            raise LedgerError(f"{site.ledger_path}: the ledger of {ledger.institution!r}")
        history = spent(ledger.records)
        acc, delta = cfg.dp.accountant, cfg.dp.delta
        fields = _record_fields(site, cfg, run_name, server_round, full)
        if cfg.dp.enabled:
            sigma = noise_for(cfg, policy, len(train_set))
            planned = Mechanism(
                sigma,
                sample_rate(len(train_set), cfg.train.batch_size),
                cfg.train.local_epochs * steps_per_epoch(len(train_set), cfg.train.batch_size),
            )
            would_reach = epsilon([*history, planned], delta, acc)
            if not would_reach <= policy.max_epsilon:  # NaN refuses too
                spent_so_far = epsilon(history, delta, acc)
                ledger.append(
                    **fields,
                    status="refused",
                    noise_multiplier=sigma,
                    sample_rate=planned.sample_rate,
                    steps=0,
                    epsilon=spent_so_far,
                    adapter_fingerprint="",
                )
                log.warning(
                    "%s refuses round %d: epsilon would reach %.3f > budget %.3f",
                    site.name,
                    server_round,
                    would_reach,
                    policy.max_epsilon,
                )
                metrics = {REFUSED: 1, EPSILON: spent_so_far, NUM_EXAMPLES: 0}
                return _reply(msg, site, metrics, ledger)
        else:
            sigma, planned = 0.0, None  # check_request: the institution allows it
        device = pick_device(site.device)
        model = build_model(cfg, device, site.rank)
        set_trainable(model, fit_rank(from_record(msg.content["arrays"]), site.rank))
        data = model_input(cfg, train_set, "train")
        seed = None if policy.insecure_seed is None else policy.insecure_seed + server_round
        mu = float(config.get(PROXIMAL_MU, 0.0))  # sent by the fedprox strategy
        result = train_round(model, data, cfg, sigma, device, seed, proximal_mu=mu)
        arrays = get_trainable(model)
        used = result.mechanism or Mechanism(0.0, 1.0, result.steps)
        eps = epsilon([*history, used], delta, acc)  # infinite without DP
        ledger.append(
            **fields,
            status="trained",
            noise_multiplier=used.noise_multiplier,
            sample_rate=used.sample_rate,
            steps=used.steps,
            epsilon=eps,
            adapter_fingerprint=adapter_fingerprint(arrays),
        )
        if planned is not None and used != planned:
            raise LedgerError(f"{site.ledger_path}: round ran {used}, planned {planned}; stopped")
        metrics = {
            REFUSED: 0,
            NUM_EXAMPLES: len(train_set),  # public: docs/threat-model.md
            EPSILON: eps,
            DELTA: delta,
            NOISE_MULTIPLIER: used.noise_multiplier,
            STEPS: result.steps,
        }
        if not cfg.dp.enabled:
            metrics[TRAIN_LOSS] = result.train_loss  # exact: released only without DP
        return _reply(msg, site, metrics, ledger, to_record(arrays, cfg.federation.transport_dtype))


def _evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    run_name = str(msg.content["config"].get(RUN_NAME, ""))
    server_round = int(msg.content["config"].get(SERVER_ROUND, 0))
    site = Institution.from_context(context, cfg, run_name)
    sigma = site.policy.local_eval_noise
    if sigma <= 0:
        return _reply(msg, site, {EVALUATED: 0})  # the institution releases no evaluation
    full, train_set, eval_set = local_data(site, cfg)
    if len(eval_set.labels) == 0:  # data.eval-fraction 0: nothing to evaluate
        return _reply(msg, site, {EVALUATED: 0})
    check_request(cfg, site.policy, site.name, len(train_set))
    with _ledger(site) as ledger:
        history = spent(ledger.records)
        acc, delta = cfg.dp.accountant, cfg.dp.delta
        release = evaluation_release(sigma)
        fields = {
            **_record_fields(site, cfg, run_name, server_round, full),
            "mechanism": EVALUATION,
            "noise_multiplier": sigma,
            "sample_rate": release.sample_rate,
            "adapter_fingerprint": "",
        }
        would_reach = epsilon([*history, release], delta, acc)
        if not would_reach <= site.policy.max_epsilon:
            ledger.append(**fields, status="refused", steps=0, epsilon=epsilon(history, delta, acc))
            return _reply(msg, site, {EVALUATED: 0, REFUSED: 1}, ledger)
        device = pick_device(site.device)
        model = build_model(cfg, device)
        set_trainable(model, from_record(msg.content["arrays"]))
        data = model_input(cfg, eval_set, "eval")
        seed = site.policy.insecure_seed
        generator = torch.Generator().manual_seed(os_seed() if seed is None else seed)
        matrix = noised_confusion(model, data, len(cfg.data.label_names), device, sigma, generator)
        ledger.append(**fields, status="evaluated", steps=release.steps, epsilon=would_reach)
        metrics = {EVALUATED: 1, EPSILON: would_reach, CONFUSION: matrix.ravel().tolist()}
        return _reply(msg, site, metrics, ledger)


def _reply(
    msg: Message,
    site: Institution,
    metrics: Mapping[str, float | list[float]],
    ledger: Ledger | None = None,
    arrays: ArrayRecord | None = None,
) -> Message:
    """The reply; with a ledger, its head (count and last hash) travels as the anchor the
    server records for ``privatune audit RUN``."""
    info: dict[str, Scalar] = {INSTITUTION: site.name}
    if ledger is not None:
        info[LEDGER_RECORDS], info[LEDGER_HEAD] = ledger.head
    content = RecordDict({"metrics": MetricRecord(dict(metrics)), "info": ConfigRecord(info)})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _guarded(
    handler: Callable[[Message, Context, RunConfig], Message], overrides: Mapping[str, Scalar]
) -> Callable[[Message, Context], Message]:
    """Turn expected failures (bad data, bad config, broken ledger) into a one-line error
    reply that the server logs with this node's id."""

    def run(msg: Message, context: Context) -> Message:
        try:
            cfg = RunConfig.from_flat({**context.run_config, **overrides})
            return handler(msg, context, cfg)
        except PrivatuneError as e:
            log.error("client error: %s", e)  # the whole message stays in the node's log
            reason = e.public if isinstance(e, DataError) else str(e)
            return Message(Error(code=CLIENT_ERROR, reason=reason), reply_to=msg)

    return run


def create_app(
    overrides: Mapping[str, Scalar] | None = None, mods: list[Mod] | None = None
) -> ClientApp:
    """A ClientApp; ``overrides`` carry the resolved config into in-process simulations,
    where Flower passes no run config; ``mods`` are Flower client mods, outermost first.
    The SecAgg+ mod is always installed (it passes plain rounds through): innermost, unless
    ``mods`` place :func:`secure_aggregation_mod` themselves (e.g. to observe both sides)."""
    overrides = dict(overrides or {})
    mods = list(mods or [])
    if secure_aggregation_mod not in mods:
        mods.append(secure_aggregation_mod)
    app = ClientApp(mods=mods)
    app.train()(_guarded(_train, overrides))
    app.evaluate()(_guarded(_evaluate, overrides))
    return app


app = create_app()
