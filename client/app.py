"""The ClientApp: one institution's side of a round.

train: load the global adapter into a fresh local model, check the round against this
institution's own privacy budget (fail closed), run DP-SGD on local data, append to the
ledger, reply with the trainable tensors and scalar metrics only.
evaluate: loss, accuracy and macro-F1 of the global adapter on the local evaluation split.
A bad data file or config becomes an error reply with one clear line, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.institution import Institution
from client.secure_aggregation import secure_aggregation_mod
from client.train import train_round
from common.adapter import (
    AdapterError,
    adapter_fingerprint,
    fit_rank,
    from_record,
    get_trainable,
    set_trainable,
    to_record,
)
from common.config import ConfigError, RunConfig, Scalar
from common.data import DataError, LabeledText, load_labeled, split_local, tokenize
from common.evaluation import evaluate
from common.ledger import Ledger, LedgerError, scope_history
from common.model import ModelError, build_model, load_tokenizer, pick_device
from common.privacy import Mechanism, epsilon, plan, sample_rate, steps_per_epoch

log = logging.getLogger("flwr")
USER_ERRORS = (DataError, ConfigError, ModelError, LedgerError, AdapterError)
CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION


@functools.lru_cache(maxsize=8)
def _local_split(
    path: Path, text_col: str, label_col: str, labels: tuple[str, ...], frac: float, seed: int
) -> tuple[LabeledText, LabeledText, LabeledText]:
    full = load_labeled(path, text_col, label_col, list(labels))
    return (full, *split_local(full, frac, seed))


def local_data(site: Institution, cfg: RunConfig) -> tuple[LabeledText, LabeledText, LabeledText]:
    """(full, train, eval) of the institution's file; read once per process."""
    return _local_split(
        site.data_path,
        site.text_column,
        site.label_column,
        tuple(cfg.data.label_names),
        cfg.data.eval_fraction,
        cfg.run.seed,
    )


def noise_for(cfg: RunConfig, num_train: int) -> float:
    """The configured noise multiplier, or one planned so that taking part in every round of
    the run spends exactly ``dp.target-epsilon``."""
    if cfg.dp.noise_multiplier > 0:
        return cfg.dp.noise_multiplier
    rate = sample_rate(num_train, cfg.train.batch_size)
    return plan(
        cfg.dp.target_epsilon,
        cfg.dp.delta,
        cfg.federation.rounds,
        cfg.train.local_epochs,
        rate,
        cfg.dp.accountant,
    ).noise_multiplier


def _train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    config = msg.content["config"]
    run_name, server_round = str(config["run-name"]), int(config["server-round"])
    site = Institution.from_context(context, cfg, run_name)
    full, train_set, _ = local_data(site, cfg)
    if len(train_set) < cfg.train.batch_size:
        raise DataError(
            f"{site.data_path}: {len(train_set)} training rows, fewer than one batch "
            f"({cfg.train.batch_size}); add data or lower train.batch-size"
        )
    ledger = Ledger(site.ledger_path)
    device = pick_device(site.device)
    history = scope_history(ledger.records, site.budget_scope, run_name)
    spent = epsilon(history, cfg.dp.delta, cfg.dp.accountant) if cfg.dp.enabled else 0.0
    if cfg.dp.enabled:
        sigma = noise_for(cfg, len(train_set))
        planned = Mechanism(
            sigma,
            sample_rate(len(train_set), cfg.train.batch_size),
            cfg.train.local_epochs * steps_per_epoch(len(train_set), cfg.train.batch_size),
        )
        would_reach = epsilon([*history, planned], cfg.dp.delta, cfg.dp.accountant)
    else:
        sigma, planned, would_reach = 0.0, Mechanism(0.0, 0.0, 0), math.inf
    fields = {
        "institution": site.name,
        "run_id": run_name,
        "round": server_round,
        "max_grad_norm": cfg.dp.max_grad_norm,
        "delta": cfg.dp.delta,
        "accountant": cfg.dp.accountant,
        "budget_scope": site.budget_scope,
        "max_epsilon": site.max_epsilon,
        "data_fingerprint": full.fingerprint,
    }
    if would_reach > site.max_epsilon:
        ledger.append(
            **fields,
            time=_now(),
            status="refused",
            noise_multiplier=planned.noise_multiplier,
            sample_rate=planned.sample_rate,
            steps=0,
            epsilon=spent,
            adapter_fingerprint="",
        )
        log.warning(
            "%s refuses round %d: epsilon would reach %.3f > budget %.3f",
            site.name,
            server_round,
            would_reach,
            site.max_epsilon,
        )
        metrics = {"refused": 1, "epsilon": spent, "would-reach": would_reach, "num-examples": 0}
        return _reply(msg, site, metrics)

    model = build_model(cfg, device, site.rank)
    set_trainable(model, fit_rank(from_record(msg.content["arrays"]), site.rank))
    data = tokenize(train_set, load_tokenizer(cfg), cfg.model.max_length)
    seed = cfg.run.seed * 1_000_003 + server_round * 1009 + zlib.crc32(site.name.encode()) % 997
    mu = float(config.get("proximal-mu", 0.0))  # sent by the fedprox strategy
    result = train_round(model, data, cfg, sigma, device, seed, proximal_mu=mu)
    arrays = get_trainable(model)
    eps = (
        epsilon([*history, result.mechanism], cfg.dp.delta, cfg.dp.accountant)
        if result.mechanism is not None
        else math.inf  # without DP nothing bounds what the round reveals
    )
    used = result.mechanism or Mechanism(0.0, 1.0, result.steps)
    ledger.append(
        **fields,
        time=_now(),
        status="trained",
        noise_multiplier=used.noise_multiplier,
        sample_rate=used.sample_rate,
        steps=used.steps,
        epsilon=eps,
        adapter_fingerprint=adapter_fingerprint(arrays),
    )
    metrics = {
        "refused": 0,
        "num-examples": len(train_set),
        "train-loss": result.train_loss,
        "epsilon": eps,
        "delta": cfg.dp.delta,
        "noise-multiplier": used.noise_multiplier,
        "steps": result.steps,
    }
    return _reply(msg, site, metrics, to_record(arrays, cfg.federation.transport_dtype))


def _evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    run_name = str(msg.content["config"].get("run-name", ""))
    site = Institution.from_context(context, cfg, run_name)
    _, _, eval_set = local_data(site, cfg)
    device = pick_device(site.device)
    model = build_model(cfg, device)
    set_trainable(model, from_record(msg.content["arrays"]))
    data = tokenize(eval_set, load_tokenizer(cfg), cfg.model.max_length)
    metrics = evaluate(model, data, len(cfg.data.label_names), device)
    return _reply(msg, site, metrics)


def _reply(
    msg: Message, site: Institution, metrics: Mapping[str, float], arrays: ArrayRecord | None = None
) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord(dict(metrics)), "info": ConfigRecord({"institution": site.name})}
    )
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
        except USER_ERRORS as e:
            log.error("client error: %s", e)
            return Message(Error(code=CLIENT_ERROR, reason=str(e)), reply_to=msg)

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
