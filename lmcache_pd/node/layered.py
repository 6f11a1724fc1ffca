"""A hand-off sent layer by layer while the prefill's forwards compute it (``transport.layerwise``; L5).

Without it a hand-off starts once the request finished, so its whole transfer runs after the
prefill's forward (docs/benchmarks.md: on CPU, 28 ms of a 4000-token prompt's KV, all of it on
the second token's path). With it the connector's scheduler half starts the hand-off in the
engine step that computes the prompt's last chunk, its worker half marks each layer computed as
vLLM's forward passes it (``save_kv_layer``; on a GPU with an event recorded on vLLM's stream),
and the sender submits that layer's pages to the transport at once, while the next layers
compute. With chunked prefill the hand-off starts with the first chunk: each step adds a *piece*
(the blocks its forward completes, with that forward's marks), so earlier chunks' layers go
while later chunks compute. Still one control round trip per hand-off: the pages are allocated
(reserved) as the first piece's forward starts, and TransferDone follows the last piece's last
layer.

:class:`LayerMarks` (one forward) and :class:`Pieces` (one hand-off) are what both threads touch:
vLLM's thread adds pieces and marks layers, the sender's loop waits on them.
:func:`send_layers` is the sender's loop over them. A preemption frees the blocks a piece reads:
:meth:`Pieces.stop` lets no new batch start, and :meth:`Pieces.wait_quiet` returns once none
is reading them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from lmcache_pd._types import BatchState, BlockId
from lmcache_pd.device_clock import Stamp
from lmcache_pd.errors import TransferError, TransferTimeout
from lmcache_pd.layout import KVLayout, PoolLayout, RangePlan, plan_into, plan_layers
from lmcache_pd.node.groups import byte_span
from lmcache_pd.node.loop import waker, woken

_IDLE_S = 1.0
"""How long a layered hand-off's loop sleeps with nothing in flight and nothing waking it."""


class LayerMarks:
    """Which layers of one layered hand-off vLLM's forward has computed (thread-safe)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._posts: list[Callable[[int, torch.cuda.Event | None], None]] = []
        """Called on each mark from :meth:`attach` on, on the marking thread (vLLM's)."""
        self._lock = threading.Lock()
        self._computed: dict[int, torch.cuda.Event | None] = {}
        self._order: list[int] = []  # layers in the order they were computed
        self.computed_at = 0.0
        """Wall clock when the forward over the last prompt chunk ended (0: not yet)."""
        self.stamp: Stamp | None = None
        """On a GPU: a stamp after the forward's kernels (the GPU's end of it, device_clock.py)."""
        self._wake: Callable[[], None] | None = None
        self._wake_each = True
        """Wake on every mark, or only on the one that completes the forward's layers."""

    def layer(self, index: int, ready: torch.cuda.Event | None = None) -> None:
        """vLLM's thread: layer ``index`` is written (on a GPU: once ``ready`` completes)."""
        with self._lock:
            if index in self._computed:  # layers sharing one KV tensor mark it twice
                return
            self._computed[index] = ready
            self._order.append(index)
            wake, posts = self._wake, self._posts
            if not self._wake_each and len(self._order) < self.num_layers:
                wake = None
        for post in posts:  # (each never raises: LayerPosts.post)
            post(index, ready)
        if wake is not None:
            wake()

    def attach(self, post: Callable[[int, torch.cuda.Event | None], None]) -> list[tuple[int, torch.cuda.Event | None]]:
        """The sender's loop: call ``post(index, ready)`` on every mark from now on, on the marking
        thread; returns the layers marked before, for the caller to post itself (each layer is
        in exactly one of the two)."""
        with self._lock:
            self._posts = [*self._posts, post]
            return [(i, self._computed[i]) for i in self._order]

    def forward_done(self, at: float | None = None, stamp: Stamp | None = None) -> None:
        """vLLM's thread: the forward ended (every layer was marked by now); ``stamp``: where
        it ends on the GPU."""
        with self._lock:
            self.computed_at = at if at is not None else time.time()
            self.stamp = stamp
            wake = self._wake
        if wake is not None:
            wake()

    def bind(self, wake: Callable[[], None], *, each: bool = True) -> None:
        """The sender's loop: call ``wake`` (thread-safe) on every mark from now on (``each``),
        else only on the mark that completes every layer; and on :meth:`forward_done`."""
        with self._lock:
            self._wake, self._wake_each = wake, each

    def since(self, seen: int) -> list[tuple[int, torch.cuda.Event | None]]:
        """Layers computed after the first ``seen`` ones, in the order they were computed."""
        with self._lock:
            return [(i, self._computed[i]) for i in self._order[seen:]]


@dataclass(frozen=True)
class Piece:
    """The blocks one forward completes: ``blocks[first:]`` (``blocks``: the prompt's so far)."""

    blocks: tuple[BlockId, ...]
    first: int
    marks: LayerMarks
    final: bool
    added_at: float
    """Wall clock when its forward's step began (the connector got its metadata)."""


class Pieces:
    """The pieces of one layered hand-off, added by vLLM's thread as its forwards run (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._pieces: list[Piece] = []
        self._wakes: list[Callable[[], None]] = []
        """One per loop reading the pieces: a hand-off to a wider decode sends them on several lanes."""
        self.stopped = ""
        """Why no batch may start any more (empty: it may)."""
        self._inflight = 0
        self._seals: list[Callable[[str], None]] = []
        """Called with the reason on :meth:`stop`: batches of posted layers, which post no more then."""

    def add(self, blocks: tuple[BlockId, ...], first: int, marks: LayerMarks, final: bool) -> None:
        """vLLM's thread: a forward that completes ``blocks[first:]`` starts (``marks``: its layers)."""
        with self._lock:
            self._pieces.append(Piece(blocks, first, marks, final, time.time()))
        # An earlier chunk's piece goes whole once its forward computed every layer: its other
        # marks would only wake the sender's loop (on CPU, on the forward's own core; on a GPU,
        # taking the GIL from the thread launching the forward's kernels) to find it incomplete.
        marks.bind(self._call_wake, each=final)
        self._call_wake()

    def wake(self) -> None:
        """Any thread: wake the loops sending these pieces (the decode side ended the hand-off:
        their next check stops it)."""
        self._call_wake()

    def _call_wake(self) -> None:
        with self._lock:
            wakes = list(self._wakes)
        for wake in wakes:
            wake()

    def bind(self, wake: Callable[[], None]) -> Callable[[], None]:
        """The sender's loop: call ``wake`` (thread-safe) on every piece and mark from now on,
        until the returned unbind is called."""
        with self._lock:
            self._wakes.append(wake)

        def unbind() -> None:
            with self._lock:
                if wake in self._wakes:
                    self._wakes.remove(wake)
        return unbind

    def since(self, seen: int) -> list[Piece]:
        with self._lock:
            return self._pieces[seen:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pieces)

    @property
    def final(self) -> Piece | None:
        """The last chunk's piece, once added."""
        with self._lock:
            return self._pieces[-1] if self._pieces and self._pieces[-1].final else None

    def admit(self) -> bool:
        """The sender's loop, before it submits a batch reading the blocks: False once stopped."""
        with self._lock:
            if self.stopped:
                return False
            self._inflight += 1
            return True

    def ended(self, n: int = 1) -> None:
        """The sender's loop: ``n`` admitted batches stopped reading the blocks (terminal)."""
        with self._lock:
            self._inflight -= n
            self._lock.notify_all()

    def stop(self, why: str) -> None:
        """Any thread: no batch may start, and no posted layer go, from now on (the blocks are
        about to be reused)."""
        with self._lock:
            self.stopped = self.stopped or why
            seals, self._seals = self._seals, []
        for seal in seals:
            seal(self.stopped)
        self._call_wake()

    def on_stop(self, seal: Callable[[str], None]) -> None:
        """The sender's loop: call ``seal(why)`` on :meth:`stop` (at once if stopped already): a
        batch of posted layers, whose marks would post its next layers without the loop."""
        with self._lock:
            if not self.stopped:
                self._seals.append(seal)
                return
        seal(self.stopped)

    def wait_quiet(self, timeout_s: float) -> bool:
        """After :meth:`stop`: wait until no admitted batch reads the blocks; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._inflight <= 0, timeout_s)


class PiecePlans:
    """How the pieces of one hand-off become range plans (the sender's loop calls it as
    ``plan(piece, layer)``): a piece whole (``layer`` None), or one layer of it, in the pool
    pages of layout ``dst`` (a KV layout: the decode's blocks, a direct hand-off). ``to`` holds
    the places of the hand-off's blocks from ``skip`` on (the decode side holds the first ones).
    ``plan``: how blocks become ranges (``DecodePeer.plan``: cut at head boundaries between TP
    sizes); ``each``: the same for every layer alone at once (``DecodePeer.plan_layers``).

    A piece's layers are laid out together the first time one is asked for: a plan per layer
    costs a dozen numpy calls, made while the forward runs and holding the GIL its thread
    needs (docs/benchmarks.md)."""

    def __init__(self, kv: KVLayout, dst: PoolLayout | KVLayout, to: list[int], skip: int, *,
                 plan: Callable[..., RangePlan] = plan_into, each: Callable[..., list[RangePlan]] = plan_layers):
        self._kv, self._dst, self._to, self._skip, self._plan, self._each = kv, dst, to, skip, plan, each
        self._layers: dict[int, tuple[Piece, list[RangePlan]]] = {}  # id(piece) -> (piece, its plan per layer)

    def __call__(self, piece: Piece, layer: int | None) -> RangePlan | None:
        """None: nothing of ``piece`` to send (every block it completes is held there)."""
        a, b = max(piece.first, self._skip), min(len(piece.blocks), self._skip + len(self._to))
        if a >= b:
            return None
        blocks, to = piece.blocks[a:b], self._to[a - self._skip:b - self._skip]
        if layer is None:
            return self._plan(self._kv, self._dst, blocks=blocks, to=to, layers=None)
        known = self._layers.get(id(piece))
        if known is None:
            known = self._layers[id(piece)] = (piece, self._each(self._kv, self._dst, blocks=blocks, to=to))
        return known[1][layer]


def stamped(post: Callable[[int, torch.cuda.Event | None], None],
            sent_at: list[float]) -> Callable[[int, torch.cuda.Event | None], None]:
    """``post``, noting in ``sent_at`` when each layer was first posted (on vLLM's thread: a
    store and a clock read, beside a post of a few microseconds)."""

    def call(index: int, ready: torch.cuda.Event | None) -> None:
        if 0 <= index < len(sent_at) and not sent_at[index]:
            sent_at[index] = time.time()
        post(index, ready)
    return call


async def forward_reported(pieces: Pieces, piece: Piece, timeout_s: float) -> None:
    """Until ``piece``'s forward reported its end (:meth:`LayerMarks.forward_done`), at most
    ``timeout_s``: a hand-off that landed before it waits here for its timeline's start."""
    if piece.marks.computed_at:
        return
    ended = asyncio.Event()
    unbind = pieces.bind(waker(asyncio.get_running_loop(), ended))  # forward_done wakes the pieces' loops
    deadline = time.monotonic() + timeout_s
    try:
        while not piece.marks.computed_at and (left := deadline - time.monotonic()) > 0:
            ended.clear()
            await woken(ended, left)
    finally:
        unbind()


async def send_layers(transport, peer_id: str, region: int, plan: Callable[[Piece, int | None], RangePlan | None],
                      pieces: Pieces, num_layers: int, *, data_s: float, ticket: bytes, check: Callable[[], None],
                      failed: Callable[[BatchState, object], None], renew: Callable[[], None] = lambda: None,
                      signal: tuple[int, int] | None = None,
                      landed: Callable[[list[int]], Awaitable[None]] | None = None,
                      post_layers: bool = False) -> tuple[float, float, list[RangePlan], bool, tuple[float, ...]]:
    """Submit each layer of the final piece (``plan(piece, layer)``; None: nothing of it to send)
    as soon as its forward's marks say it is computed, and each earlier piece whole
    (``plan(piece, None)``) once its forward computed every layer; return when all of it is in
    the peer's pool: the transfer's first and last byte (``groups.byte_span``), the plans sent,
    whether the final piece's layers were posted by its marks (``post_layers``, below), and when
    each of its layers was handed to the transport (wall clock by layer index, 0.0 for a layer
    with nothing to send: the hand-off timeline's "each layer sent").

    An earlier chunk's piece goes in one batch because only the last chunk's forward is on the
    hand-off's path: the next chunk's forward hides the whole piece, and one batch instead of
    one per layer saves the host's work per batch (measured on one H200: 128 batches of 4
    chunks outlasted a 20 ms forward, docs/benchmarks.md).

    Deadlines (``timeouts.data_s``, named in the error): each next layer must be marked within
    ``data_s`` of the last progress (a forward that stops fails the hand-off), and the bytes
    must have landed within ``data_s`` of the last submit. ``renew`` is called for each new
    piece (the hand-off's own deadline grows with its chunks). ``check`` raises when the
    hand-off must stop (the decode side ended it); ``failed`` raises for a batch that ended
    otherwise than DONE; a stopped ``pieces`` (a preemption) ends it once no batch of it is in
    flight. On a GPU a layer goes after its event: ordered on the device by a stream-ordered
    transport, else once the event completed. ``signal``: the landing signal the hand-off's
    last batch ends with (transport/landing.py). ``landed(layers)``: called as layers of the final
    piece land in every page of the hand-off (their batch and every batch before it are DONE,
    and no earlier piece is still to be sent): the sender tells a decode side that cannot see
    batches land (Landed), so that it scatters them while the next layers compute; not for the
    layers that complete the hand-off, whose TransferDone follows at once.

    ``post_layers`` (``transport.post_layers``; a transport with ``capabilities.posts_layers``,
    and no ``landed`` to report): the final piece goes in one batch, prepared as soon as it is
    known and every earlier piece is submitted (``Transport.prepare_layers``); its marks post
    each layer from then on, on the marking thread (vLLM's: a launch of a few microseconds), and
    this loop sleeps until the batch ends (a preemption, :meth:`Pieces.stop`, seals it: no
    more posts, and it ends once what was posted stopped). Nothing of ours wakes per layer while
    the forward runs: on a GPU the sender's thread would hold the GIL that vLLM's thread needs to launch
    the forward's next kernels (docs/benchmarks.md)."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    unbind = pieces.bind(waker(loop, wake))
    ordered = transport.capabilities.stream_ordered
    ahead = post_layers and transport.capabilities.posts_layers and landed is None
    prepared = False  # the final piece was prepared for its marks to post (or had nothing to send)
    posted = None  # its batch
    handles: list = []
    open_: list = []  # admitted handles not yet seen terminal
    sent: list[RangePlan] = []
    known: list[tuple[Piece, int]] = []  # pieces seen, and how many of their layers were taken
    waiting: list[tuple[Piece, int | None, torch.cuda.Event | None]] = []  # computed, event not yet complete
    pending = 0  # batches of known pieces not yet submitted (or found empty): a layer, or a whole piece
    earlier = 0  # earlier pieces (not final) not yet submitted (or found empty)
    layers: list[tuple[int, RangePlan]] = []  # the final piece's layers, once prepared for its marks to post
    layer_of: list[int | None] = []  # per handle: its final piece's layer, if reported as landed
    reported = 0  # handles[:reported] were DONE and their layers reported
    final = False
    first_byte_at = 0.0
    sent_at = [0.0] * num_layers  # the final piece's layers: when each was handed to the transport
    progress = time.monotonic()
    try:
        while True:
            wake.clear()
            for piece in pieces.since(len(known)):
                known.append((piece, 0))
                pending += num_layers if piece.final else 1
                earlier += 0 if piece.final else 1
                final = final or piece.final
                renew()
            for k, (piece, taken) in enumerate(known):
                if ahead and piece.final:
                    continue  # one batch, its layers posted by its marks (below)
                new = piece.marks.since(taken)
                if not new:
                    continue
                known[k] = (piece, taken + len(new))
                progress = time.monotonic()  # the forwards move on
                if piece.final:
                    waiting += [(piece, index, ready) for index, ready in new]
                elif taken + len(new) == num_layers:  # its forward computed every layer (the last event is the latest)
                    waiting.append((piece, None, new[-1][1]))
            for item in list(waiting):
                piece, index, ready = item
                if ready is not None and not ordered and not ready.query():
                    continue
                if pieces.stopped:
                    break
                waiting.remove(item)
                pending -= 1
                earlier -= 0 if piece.final else 1
                p = plan(piece, index)
                if p is None:
                    continue
                if not pieces.admit():
                    break
                last = {"signal": signal} if signal is not None and final and not pending else {}
                # Stamped before the submit: a transport may land the batch before it returns.
                now = time.time()
                first_byte_at = first_byte_at or now
                if piece.final and index is not None:
                    sent_at[index] = now
                handle = transport.submit(peer_id, region, p, timeout_s=data_s,
                                          after=ready, ticket=ticket, **last)
                handle.add_done_callback(waker(loop, wake))
                handles.append(handle)
                layer_of.append(index if piece.final and not earlier else None)
                open_.append(handle)
                sent.append(p)
                progress = time.monotonic()
            if ahead and final and not prepared and not earlier and not pieces.stopped:
                piece, prepared = known[-1][0], True
                pending -= num_layers
                layers = [(i, p) for i in range(num_layers) if (p := plan(piece, i)) is not None]
                if layers and pieces.admit():
                    unbind()  # nothing but the batch's end wakes this loop from now on
                    last = {"signal": signal} if signal is not None and not pending else {}
                    posts = transport.prepare_layers(peer_id, region, layers, timeout_s=data_s, ticket=ticket, **last)
                    post = stamped(posts.post, sent_at)
                    pieces.on_stop(posts.seal)  # a preemption: its marks post no more layers
                    for index, ready in piece.marks.attach(post):  # those computed before now
                        post(index, ready)
                    posted = posts.handle
                    posted.add_done_callback(waker(loop, wake))
                    handles.append(posted)
                    layer_of.append(None)
                    open_.append(posted)
                    sent += [p for _, p in layers]
                    progress = time.monotonic()
            for h in list(open_):  # (only those in flight: a chunked prompt may have hundreds)
                state = transport.poll(h)
                if state.terminal:
                    open_.remove(h)
                    pieces.ended()
                    if state != BatchState.DONE:
                        failed(state, h)
            in_flight = bool(open_)
            complete = final and not pending and not waiting and not in_flight
            if landed is not None:
                done: list[int] = []
                while reported < len(handles) and handles[reported].state == BatchState.DONE:
                    if layer_of[reported] is not None:
                        done.append(layer_of[reported])
                    reported += 1
                # The layers that complete the hand-off are not reported: its TransferDone comes
                # next and says so (one message, not two, as for a streamed hand-off's last
                # group); the decode scatters them then.
                if done and not pieces.stopped and not complete:
                    await landed(done)
            if pieces.stopped and not in_flight:
                raise TransferError(pieces.stopped)
            if complete:
                # Posted layers' first byte, where the transport does not stamp its own: the first post.
                first = first_byte_at or min((t for t in sent_at if t), default=0.0) or time.time()
                return (*byte_span(handles, first), sent, posted is not None, tuple(sent_at))
            if not pieces.stopped:
                check()
            # Posted layers move on without this loop: their posts (stamped in sent_at) are progress.
            idle = min(time.monotonic() - progress, time.time() - max(sent_at))
            if idle > data_s:
                unposted = posted is not None and not all(sent_at[i] for i, _ in layers)
                what = ("the prefill's forward to compute the next layer" if not in_flight or unposted
                        else "data transfer")
                raise TransferTimeout(what, config_field="timeouts.data_s", seconds=data_s)
            # Woken by a mark, a piece or a transport callback; the short timeout keeps polling
            # transports that progress only inside poll(), and events without a callback. Between
            # layers, with nothing in flight, only a mark wakes it: a wake-up costs the forward
            # (vLLM's thread, on the same core on CPU) the GIL.
            # The posted batch's end wakes it (its callback), and so does the decode's end of the
            # hand-off (Pieces.wake), which check() then sees; else it looks once a second (the
            # deadline above is data_s): a wake-up is about 0.1-0.2 ms of the prefill core's CPU.
            await woken(wake, 0.005 if waiting or any(h is not posted for h in open_) else _IDLE_S)
    finally:
        unbind()
        for handle in handles:
            handle.close()  # cancels layers still in flight after a failure
        if open_:
            pieces.ended(len(open_))
