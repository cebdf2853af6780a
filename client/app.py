"""The ClientApp: one institution's side of a round.

train: load the global adapter into a fresh local model, check the request against this
institution's own policy, schema and lifetime budget under the ledger's lock (fail closed),
release the DP count of its training rows once per data version (the size it plans, samples
and is weighted by), run DP-SGD on local data, append the release to the signed ledger,
reply with the trainable tensors and only the values the threat model
(docs/threat-model.md) lists.
evaluate: off unless the institution sets ``local-eval-noise``; then a noised confusion
matrix of the global adapter on the local evaluation split, accounted in the same ledger.
Any failure becomes an error reply with the institution's name and a fixed sentence that no
row, count or value of the data can change; the full message stays in the node's own log.
A request the node refuses (its policy, schema or budget) is a ledger record; after
``max-refusals`` of them in a row the node stops answering.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import random
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from privatune.client.institution import Institution, Policy, simulated_name
from privatune.client.secure_aggregation import secure_aggregation_mod
from privatune.client.train import os_seed, train_round
from privatune.common.config import ConfigError, RunConfig, Scalar
from privatune.common.data import DataError, LabeledText, load_labeled, split_local
from privatune.common.logs import quiet
from privatune.common.model.adapter import (
    adapter_fingerprint,
    fit_rank,
    from_record,
    get_trainable,
    set_trainable,
    to_record,
)
from privatune.common.model.build import build_model, encode
from privatune.common.model.evaluation import noised_confusion
from privatune.common.model.features import cached_embed
from privatune.common.model.hub import pick_device
from privatune.common.model.top_layers import cached_lower_states, uses_top_layers
from privatune.common.privacy.accounting import (
    Mechanism,
    count_release,
    epsilon,
    planned_noise,
    public_size,
    sample_rate,
    steps_per_epoch,
)
from privatune.common.privacy.ledger import (
    COUNT_MECHANISM,
    NOISE_FROM_OS,
    NOTHING,
    Ledger,
    LedgerError,
    spent,
)
from privatune.common.protocol import (
    CONFUSION,
    DELTA,
    EPSILON,
    EVALUATED,
    INSTITUTION,
    LEDGER_HEAD,
    LEDGER_RECORDS,
    LEDGER_SEEN,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    REFUSED,
    RUN_NAME,
    SERVER_ROUND,
    STEPS,
    TRAIN_LOSS,
    error_reason,
)
from torch.utils.data import TensorDataset

log = logging.getLogger("flwr")
CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
EVALUATION = "gaussian (noised confusion matrix, L2 sensitivity 1)"
# The only reasons an error reply gives, after the institution's name: fixed text that no row,
# count or value of the data can change (docs/threat-model.md). A refusal of the run's
# request states the rule, which depends on the run config and the policy only.
DATA_FAILED = "its data file cannot be used (details in the node's own log)"
LEDGER_FAILED = "its privacy ledger failed a check; it trains no more (details in its log)"
CONFIG_FAILED = "its node config or the run config is invalid (details in the node's own log)"
FAILED = "the request failed at this node (details in the node's own log)"
STOPPED = "it refused too many requests in a row and stops answering (max-refusals)"


class RequestRefused(ConfigError):
    """The run asks what this institution does not allow: its policy or its schema. The
    message depends on the run config and the node config only; it is sent as it is."""


class Stopped(LedgerError):
    """The node refused ``max-refusals`` requests in a row and answers no more."""


@functools.lru_cache(maxsize=32)
def _local_split(
    path: Path,
    text_col: str,
    label_col: str,
    labels: tuple[str, ...],
    frac: float,
    encoding: str,
) -> tuple[LabeledText, LabeledText, LabeledText]:
    full = load_labeled(path, text_col, label_col, list(labels), encoding)
    return (full, *split_local(full, frac))


def local_data(site: Institution) -> tuple[LabeledText, LabeledText, LabeledText]:
    """(full, train, eval) of the institution's file, read with its own schema and split;
    read once per process."""
    return _local_split(
        site.data_path,
        site.text_column,
        site.label_column,
        site.labels,
        site.eval_fraction,
        site.encoding,
    )


_INPUTS: dict[tuple, TensorDataset] = {}


def model_input(
    cfg: RunConfig, data: LabeledText, part: str, frac: float | None = None
) -> TensorDataset:
    """A local split as the model's input: token ids, or what no round changes, kept in the
    node's private disk cache: the frozen encoder's pooled embeddings (``train.trainable =
    "head"``, common.model.features) or, to train, the frozen lower layers' output (``lora.layers``,
    common.model.top_layers). Kept per process, keyed by the data, its split ``frac``
    (default ``data.eval-fraction``) and everything in the config that shapes them."""
    key = (
        data.path,
        data.fingerprint,
        part,
        cfg.data.eval_fraction if frac is None else frac,
        tuple(cfg.data.label_names),
        cfg.model,
        cfg.train.trainable,
    )
    if key not in _INPUTS:
        if len(_INPUTS) >= 32:
            _INPUTS.pop(next(iter(_INPUTS)))
        if cfg.train.trainable == "head":
            _INPUTS[key] = cached_embed(build_model(cfg, pick_device()), data, cfg)
        elif uses_top_layers(cfg) and part == "train":
            _INPUTS[key] = cached_lower_states(build_model(cfg, pick_device()), data, cfg)
        else:
            _INPUTS[key] = encode(data, cfg)
    return _INPUTS[key]


def noise_for(cfg: RunConfig, policy: Policy, size: int) -> float:
    """The configured noise multiplier, or one planned so that taking part in every round of
    the run (with its local evaluation, when the institution releases one, and the DP count
    of its rows) spends exactly ``dp.target-epsilon``. ``size`` is that DP count."""
    if cfg.dp.noise_multiplier > 0:
        return cfg.dp.noise_multiplier
    return planned_noise(
        cfg.dp.target_epsilon,
        cfg.dp.delta,
        cfg.federation.rounds,
        cfg.train.local_epochs,
        sample_rate(size, cfg.train.batch_size),
        cfg.dp.accountant,
        eval_noise=policy.local_eval_noise,
        count_noise=policy.count_noise,
    )


def check_request(cfg: RunConfig, policy: Policy, who: str, size: int | None = None) -> None:
    """What the run asks against what the institution allows; one line on refusal. ``size``
    is the DP count of the training rows (never the exact count)."""
    if cfg.dp.delta > policy.max_delta:
        raise RequestRefused(
            f"{who}: dp.delta {cfg.dp.delta:g} exceeds max-delta {policy.max_delta:g}"
        )
    if size is not None and cfg.dp.delta >= 1 / size:
        raise RequestRefused(
            f"{who}: dp.delta {cfg.dp.delta:g} must be below 1/n of the training rows"
        )
    if cfg.dp.accountant not in policy.accountants:
        raise RequestRefused(
            f"{who}: dp.accountant {cfg.dp.accountant!r} is not one this institution accepts "
            f"({', '.join(policy.accountants)})"
        )
    if not cfg.dp.enabled and not policy.allow_non_private:
        raise RequestRefused(f"{who}: dp.enabled = false, and this institution requires DP")


def check_schema(cfg: RunConfig, site: Institution) -> None:
    """In deployment the node owns its data schema: a run whose labels differ is refused
    with one line that no row changes (the node never reads its file against the run's)."""
    if site.simulated:
        return
    if tuple(cfg.data.label_names) != site.labels:
        raise RequestRefused(
            f"{site.name}: data.labels of the run differs from this institution's labels "
            "(node config labels)"
        )


def _ledger(site: Institution, seen: int = 0):
    """The institution's ledger under its lock; a simulation creates it on first use."""
    return Ledger.locked(
        site.ledger_path,
        site.signing_key,
        site.anchor_path,
        create_for=site.name if site.simulated else "",
        seen=seen,
    )


def _record_fields(site: Institution, cfg: RunConfig, run_name: str, rnd: int, data) -> dict:
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
        "data_fingerprint": data.fingerprint,
        "adapter_fingerprint": "",
    }


def _refused_in_a_row(ledger: Ledger) -> int:
    n = 0
    for rec in reversed(ledger.records):
        if rec.status != "refused":
            break
        n += 1
    return n


def _checked(ledger: Ledger, site: Institution, checks: Callable[[], None], fields: dict) -> None:
    """Run the request's checks; a refusal is a ledger record, and past ``max-refusals`` in
    a row the node stops answering (the server could otherwise probe without limit)."""
    if _refused_in_a_row(ledger) >= site.policy.max_refusals:
        raise Stopped(f"{ledger.path}: {site.name} {STOPPED}")
    try:
        checks()
    except RequestRefused:
        ledger.refuse(**fields)
        raise


def _count_rng(policy: Policy) -> random.Random:
    seed = policy.insecure_seed
    return random.SystemRandom() if seed is None else random.Random(seed * 7919)


def dp_size(
    ledger: Ledger, site: Institution, cfg: RunConfig, train_set: LabeledText, fields: dict
) -> int | None:
    """The DP count of the training rows: released once per version of the training set
    (a ``counted`` ledger record, a Gaussian mechanism of sensitivity 1), then reused
    (post-processing). None when the budget cannot pay for it."""
    key = _split_fingerprint(train_set, site.eval_fraction)
    known = ledger.count_for(key)
    if known is not None:
        return known
    release = count_release(site.policy.count_noise)
    history = spent(ledger.records)
    would_reach = epsilon([*history, release], cfg.dp.delta, cfg.dp.accountant)
    if not would_reach <= site.policy.max_epsilon:
        return None
    size = public_size(len(train_set), site.policy.count_noise, _count_rng(site.policy))
    ledger.release(
        "counted",
        release,
        would_reach,
        **{**fields, "data_fingerprint": key, "mechanism": COUNT_MECHANISM},
        count=size,
    )
    return size


def _split_fingerprint(train_set: LabeledText, frac: float) -> str:
    return hashlib.sha256(f"{train_set.fingerprint}|{frac!r}".encode()).hexdigest()


def _refuse_budget(
    ledger: Ledger, site: Institution, fields: dict, asked: Mechanism, rnd: int
) -> dict[str, float]:
    """A round the budget cannot pay for: on record, and the reply that says so."""
    spent_so_far = ledger.refuse(asked, **fields)
    log.warning(
        "%s refuses round %d: the budget %.3f would be crossed",
        site.name,
        rnd,
        site.policy.max_epsilon,
    )
    return {REFUSED: 1, EPSILON: spent_so_far, NUM_EXAMPLES: 0}


def _train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    config = msg.content["config"]
    run_name, server_round = str(config[RUN_NAME]), int(config[SERVER_ROUND])
    site = Institution.from_context(context, cfg, run_name)
    policy = site.policy
    full, train_set, _ = local_data(site)
    with _ledger(site, int(config.get(LEDGER_SEEN, 0))) as ledger:
        if ledger.institution != site.name:
            raise LedgerError(f"{site.ledger_path}: the ledger of {ledger.institution!r}")
        acc, delta = cfg.dp.accountant, cfg.dp.delta
        fields = _record_fields(site, cfg, run_name, server_round, full)

        def checks() -> None:
            check_schema(cfg, site)
            check_request(cfg, policy, site.name)

        _checked(ledger, site, checks, fields)
        size = dp_size(ledger, site, cfg, train_set, fields)
        if size is None:  # the budget cannot pay even for the count
            metrics = _refuse_budget(ledger, site, fields, NOTHING, server_round)
            return _reply(msg, site, metrics, ledger)
        _checked(ledger, site, lambda: check_request(cfg, policy, site.name, size), fields)
        history = spent(ledger.records)
        rate = sample_rate(size, cfg.train.batch_size)
        if cfg.dp.enabled:
            sigma = noise_for(cfg, policy, size)
            planned = Mechanism(
                sigma, rate, cfg.train.local_epochs * steps_per_epoch(size, cfg.train.batch_size)
            )
            would_reach = epsilon([*history, planned], delta, acc)
            if not would_reach <= policy.max_epsilon:  # NaN refuses too
                metrics = _refuse_budget(ledger, site, fields, planned, server_round)
                return _reply(msg, site, metrics, ledger)
        else:
            sigma, planned = 0.0, None  # check_request: the institution allows it
        device = pick_device(site.device)
        model = build_model(cfg, device, site.rank)  # every stage's tensors travel
        set_trainable(model, fit_rank(from_record(msg.content["arrays"]), site.rank))
        stage = cfg.in_round(server_round)  # train.probe-rounds: the head alone at first
        data = model_input(stage, train_set, "train", site.eval_fraction)
        seed = None if policy.insecure_seed is None else policy.insecure_seed + server_round
        mu = float(config.get(PROXIMAL_MU, 0.0))  # sent by the fedprox strategy
        result = train_round(model, data, stage, sigma, device, seed, proximal_mu=mu, size=size)
        arrays = get_trainable(model)
        used = result.mechanism or Mechanism(0.0, 1.0, result.steps)
        eps = epsilon([*history, used], delta, acc)  # infinite without DP
        ledger.release(
            "trained", used, eps, **{**fields, "adapter_fingerprint": adapter_fingerprint(arrays)}
        )
        if planned is not None and used != planned:
            raise LedgerError(f"{site.ledger_path}: round ran {used}, planned {planned}; stopped")
        metrics = {
            REFUSED: 0,
            NUM_EXAMPLES: size,  # the DP count: docs/threat-model.md
            EPSILON: eps,
            DELTA: delta,
            NOISE_MULTIPLIER: used.noise_multiplier,
            STEPS: result.steps,
        }
        if not cfg.dp.enabled:
            metrics[TRAIN_LOSS] = result.train_loss  # exact: released only without DP
        return _reply(msg, site, metrics, ledger, to_record(arrays, cfg.federation.transport_dtype))


def _evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    config = msg.content["config"]
    run_name = str(config.get(RUN_NAME, ""))
    server_round = int(config.get(SERVER_ROUND, 0))
    site = Institution.from_context(context, cfg, run_name)
    sigma = site.policy.local_eval_noise
    if sigma <= 0:
        return _reply(msg, site, {EVALUATED: 0})  # the institution releases no evaluation
    full, _, eval_set = local_data(site)
    with _ledger(site, int(config.get(LEDGER_SEEN, 0))) as ledger:
        acc, delta = cfg.dp.accountant, cfg.dp.delta
        fields = {
            **_record_fields(site, cfg, run_name, server_round, full),
            "mechanism": EVALUATION,
        }

        def checks() -> None:
            check_schema(cfg, site)
            check_request(cfg, site.policy, site.name)

        _checked(ledger, site, checks, fields)
        history = spent(ledger.records)
        release = count_release(sigma)
        would_reach = epsilon([*history, release], delta, acc)
        if not would_reach <= site.policy.max_epsilon:
            ledger.refuse(release, **fields)
            return _reply(msg, site, {EVALUATED: 0, REFUSED: 1}, ledger)
        device = pick_device(site.device)
        model = build_model(cfg, device)
        set_trainable(model, from_record(msg.content["arrays"]))
        # An empty evaluation split still releases a (noise-only) matrix: whether it is empty
        # is a fact about the rows.
        data = model_input(cfg, eval_set, "eval", site.eval_fraction) if len(eval_set) else None
        seed = site.policy.insecure_seed
        generator = torch.Generator().manual_seed(os_seed() if seed is None else seed)
        matrix = noised_confusion(model, data, len(cfg.data.label_names), device, sigma, generator)
        ledger.release("evaluated", release, would_reach, **fields)
        metrics = {EVALUATED: 1, EPSILON: would_reach, CONFUSION: matrix.ravel().tolist()}
        return _reply(msg, site, metrics, ledger)


def _reply(
    msg: Message,
    site: Institution,
    metrics: Mapping[str, float | list[float]],
    ledger: Ledger | None = None,
    arrays: ArrayRecord | None = None,
) -> Message:
    """The reply; with a ledger, its head (count and last hash: a hiding commitment, each
    record holds a secret nonce) travels as the anchor the server records for
    ``privatune audit RUN``."""
    info: dict[str, Scalar] = {INSTITUTION: site.name}
    if ledger is not None:
        info[LEDGER_RECORDS], info[LEDGER_HEAD] = ledger.head
    content = RecordDict({"metrics": MetricRecord(dict(metrics)), "info": ConfigRecord(info)})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def public_reason(error: BaseException) -> str:
    """What an error reply may say: the rule a refused request broke (run config and policy
    only), else a fixed sentence per kind of failure; never the exception's own text, which
    may carry a row, a count or a tensor size."""
    if isinstance(error, RequestRefused):
        return str(error).partition(": ")[2] or str(error)
    if isinstance(error, Stopped):
        return STOPPED
    if isinstance(error, LedgerError):
        return LEDGER_FAILED
    if isinstance(error, DataError):
        return DATA_FAILED
    if isinstance(error, ConfigError):
        return CONFIG_FAILED
    return FAILED


def _guarded(
    handler: Callable[[Message, Context, RunConfig], Message], overrides: Mapping[str, Scalar]
) -> Callable[[Message, Context], Message]:
    """Turn every failure into an error reply with the institution's name and fixed text
    (:func:`public_reason`); the whole message, and the traceback of anything unexpected,
    stay in the node's own log."""

    def run(msg: Message, context: Context) -> Message:
        quiet()  # the ClientApp's entry point, in whichever process runs it
        flat = {**context.run_config, **overrides}
        try:
            return handler(msg, context, RunConfig.from_flat(flat))
        except Exception as e:  # nothing unexpected may reach the server as it is
            if isinstance(e, ConfigError | DataError | LedgerError):
                log.error("client error: %s", e)
            else:
                log.exception("client error")
            reason = error_reason(_public_name(context, flat), public_reason(e))
            return Message(Error(code=CLIENT_ERROR, reason=reason), reply_to=msg)

    return run


def _public_name(context: Context, flat: Mapping[str, Scalar]) -> str:
    """The institution's public name for an error reply, without reading any data."""
    if "institution" in context.node_config:
        return str(context.node_config["institution"])
    try:
        data_dir = Path(str(flat["data.dir"]))
        return simulated_name(data_dir, int(context.node_config.get("partition-id", 0)))
    except Exception:  # a name is a courtesy; the reply goes out regardless
        return f"node-{context.node_id}"


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
