"""The client half of secure aggregation: Flower's SecAgg+ mod around our train handler.

Flower's ``secaggplus_mod`` speaks the legacy fit format (``fitins.*`` in, ``fitres.*`` out)
and runs the handler only in its masked-vector stage; our handler reads ``config`` and
named ``arrays`` and replies with ``arrays``/``metrics``/``info``. :func:`secure_aggregation_mod`
translates both ways, so the handler is the same with and without SecAgg+. The adapter's
tensor names travel in the fit config (``adapter-names``, comma-separated) because legacy
parameters are an unnamed list.

A client that refuses the round (privacy budget, no arrays in its reply) still completes the
protocol: it contributes zeros with weight 0, so the weighted mean is that of the others and
the server learns nothing it would not learn from the ``refused`` metric anyway. A client whose
handler fails replies with the error and counts as a dropout; the protocol recovers its masks
as long as enough neighbours stay (``aggregation.secure-threshold``).

The mod is safe to install always: any message without SecAgg+ configs passes straight on.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from privatune.common.model.adapter import from_record, to_record
from privatune.common.protocol import NAMES_KEY, NUM_EXAMPLES


class _HandlerFailed(Exception):
    """Carries the handler's error reply out through ``secaggplus_mod`` unchanged."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ for train messages that carry its configs; everything else passes through."""
    if msg.metadata.message_type != MessageType.TRAIN or (
        RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return call_next(msg, context)

    def train(fit_msg: Message, ctxt: Context) -> Message:
        fitins = compat.recorddict_to_fitins(fit_msg.content, keep_input=True)
        names = str(fitins.config[NAMES_KEY]).split(",")
        global_arrays = dict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
        config = {k: v for k, v in fitins.config.items() if k != NAMES_KEY}
        fit_msg.content = RecordDict(
            {"config": ConfigRecord(config), "arrays": to_record(global_arrays)}
        )
        reply = call_next(fit_msg, ctxt)
        if reply.has_error():
            raise _HandlerFailed(reply)
        content = compat.fitres_to_recorddict(_to_fitres(reply.content, global_arrays), True)
        return Message(content, reply_to=fit_msg)

    try:
        return secaggplus_mod(msg, context, train)
    except _HandlerFailed as failed:
        return Message(failed.reply.error, reply_to=msg)


def _to_fitres(content: RecordDict, global_arrays: dict[str, np.ndarray]) -> FitRes:
    """Our reply as the FitRes the protocol masks: arrays in the names' order, the weight
    as ``num_examples``, scalar metrics and the institution as fit metrics. A reply without
    arrays (a refusal) becomes zeros of weight 0."""
    metrics = dict(next(iter(content.metric_records.values()), {}))
    info = content.config_records.get("info", ConfigRecord())
    arrays = content.array_records.get("arrays", ArrayRecord())
    if len(arrays):
        values = from_record(arrays)
        weight = int(metrics[NUM_EXAMPLES])
        ndarrays = [values[name] for name in global_arrays]
    else:
        weight = 0
        ndarrays = [np.zeros_like(v) for v in global_arrays.values()]
    return FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(ndarrays),
        num_examples=weight,
        metrics={**metrics, **info},
    )
