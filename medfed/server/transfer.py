"""A Grid that sends arrays packed and in ``federation.transfer_dtype``, and unpacks and
widens the replies' arrays back to float32 (see :mod:`medfed.transfer`)."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from medfed.server.grid import DelegatingGrid
from medfed.transfer import from_wire, to_wire

__all__ = ["TransferGrid"]


def _map_arrays(message: Message, convert) -> Message:  # noqa: ANN001 - ArrayRecord -> ArrayRecord
    if message.has_error() or not message.content.array_records:
        return message
    try:
        content = RecordDict({key: convert(record) if key in message.content.array_records else record
                              for key, record in message.content.items()})
    except ValueError as error:
        # A reply that cannot be unpacked keeps its packed record: the strategy's reply
        # check then drops it (its array names are not the model's), under the site's name.
        log(WARNING, "Reply of node %s: %s", message.metadata.src_node_id, error)
        return message
    message.content = content
    return message


class TransferGrid(DelegatingGrid):
    """Delegates to ``grid``; packs and encodes outgoing arrays, unpacks and decodes incoming ones.

    Wrap the recording grid with it, so that byte counts are those on the wire.

    Parameters
    ----------
    grid : Grid
        The Grid to delegate to.
    dtype : {"float32", "float16", "bfloat16"}
        Transfer dtype of float32 arrays.
    """

    def __init__(self, grid: Grid, dtype: str) -> None:
        super().__init__(grid)
        self.dtype = dtype

    def _encode(self, messages: Iterable[Message]) -> list[Message]:
        # A strategy sends every site the same ArrayRecord object: pack it once per call,
        # not once per site (a copy of the whole model each).
        packed: dict[int, tuple[ArrayRecord, ArrayRecord]] = {}

        def convert(record: ArrayRecord) -> ArrayRecord:
            if id(record) not in packed:  # the record is kept with its id so the id stays its own
                packed[id(record)] = (record, to_wire(record, self.dtype))
            return packed[id(record)][1]

        return [_map_arrays(m, convert) for m in messages]

    @staticmethod
    def _decode(replies: Iterable[Message]) -> list[Message]:
        return [_map_arrays(m, from_wire) for m in replies]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._encode(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._decode(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._decode(self._grid.send_and_receive(self._encode(messages), timeout=timeout))
