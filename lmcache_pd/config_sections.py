"""The sections of the deployment's config, each a frozen struct with its defaults (L1, below
config.py, which puts them together as ``PDConfig``, loads and checks it).

A field that is unknown or of the wrong type is refused by msgspec, naming the field and its
source (config.load_config); docs/config.md lists every field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelConfig(Section):
    path: str
    """Local model directory (or Hugging Face id where downloads are possible)."""
    served_name: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    block_size: Positive | None = None
    """vLLM block size; None takes vLLM's platform default (128 on CPU, 16 on GPU)."""
    max_model_len: Positive = 4096
    seed: int = 0


class InstanceConfig(Section):
    name: str
    http_port: Port
    host: str = "127.0.0.1"
    control_port: Port | None = None
    """Decode only: zmq control plane (allocation) port of TP rank 0; rank r uses +r."""
    data_port: Port | None = None
    """Decode only: data-plane port of TP rank 0 for transports that listen (tcp); rank r uses +r."""
    data_advertise: str | None = None
    """Decode only: ``host:port`` that prefill workers connect to for the data plane (TP rank 0;
    rank r: port + r), when it is not where this instance listens (a relay, NAT, a port
    forward). None: the listening address."""
    cache_port: Port | None = None
    """HTTP port of the prefix cache's control API and metrics, TP rank 0; rank r uses +r.
    None: no API (the cache still works). Served by prefill instances with ``cache.enabled``."""
    tp_size: Positive = 1
    cpus: str | int | None = None
    """CPUs the launcher pins the instance to (``taskset -c``) and binds vLLM's OpenMP threads to,
    e.g. ``"0-3"`` or ``1``; per TP rank, separated by ``|`` (``"0|1"``: rank 0 on CPU 0, rank 1 on 1)."""
    kv_cache_gib: Positive = 1
    """CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE); GPU uses --gpu-memory-utilization."""
    vllm_args: tuple[str, ...] = ()
    """Extra vLLM CLI arguments, appended as given."""
    env: dict[str, str] = {}


class TransportConfig(Section):
    name: str = "tcp"
    options: dict[str, Any] = {}
    """Transport-specific options, validated by the transport's own ``Options`` struct."""
    group_mib: NonNegative = 0
    """Stream a hand-off larger than this in groups of pages of about this size: the decode side
    scatters each group as soon as it has landed, while the next ones are in flight. 0 (default)
    sends every hand-off as one group: on one H100 streaming measured slower, because each group
    costs host time (docs/benchmarks.md); measure with ``benchmarks/handoff.py --group-mib``."""
    layerwise: bool = True
    """Send each layer of a prompt's KV as soon as the prefill's forward has computed it, while
    the next layers compute (node/layered.py), instead of all of it after the request finished. ``group_mib`` does not apply to such a hand-off. On by default: it measured
    faster from 16 MiB on, on CPU and on one H200 (docs/benchmarks.md). On a GPU the prefill
    instance then runs vLLM's piecewise CUDA graphs (a full graph runs no per-layer hook)."""
    layerwise_min_mib: NonNegative = 8
    """With ``layerwise``, a hand-off smaller than this goes whole instead, as soon as the forward
    that computed its last chunk ended (still a step earlier than without ``layerwise``): a batch
    per layer cost more than it hid for small ones (2 MiB: 0.13 ms slower layered on one H200).
    0: every hand-off goes layer by layer."""
    layerwise_on_shared_gpu: bool = False
    """With ``layerwise``, send layer by layer also to a decode whose pool is on the prefill's own
    GPU (another process: ``Transport.shares_device``, cuda_ipc and nixl) and whose request comes
    only after the prefill answered (the proxy's ``first_token: prefill`` path). Off (default):
    such a hand-off goes whole as the forward over its last chunk ends, as one below
    ``layerwise_min_mib``: nobody waits for it before then, its copy is device-local, and the
    per-layer work slowed vLLM's forward, and with it the prefill's first token (1.3-1.5 ms at 8192
    tokens, up to 2.2 at 1024, inside vLLM's engine on one H100, docs/benchmarks.md). A decode
    already waiting (the proxy sent its request at once: ``decode_sent``) still gets layers: the
    last one lands before the forward's tail ends (5.5 ms sooner at 8192 tokens). Decided per
    hand-off at its first piece, from the link to that decode: the first hand-off to a decode not
    linked yet goes layer by layer."""
    layerwise_chunks: bool = True
    """With ``layerwise`` and chunked prefill, start the hand-off with the prompt's first chunk:
    the blocks each chunk's forward completes go during the next (one batch each), and only the
    last chunk's go layer by layer; a preempted request's hand-off is given up (the decode side
    recomputes). Off: the hand-off starts with the last chunk's forward, every block layer by
    layer. vLLMs whose scheduler does not name preempted requests always do the latter."""
    landed_on_shared_gpu: bool = False
    """With ``layerwise`` over cuda_ipc or nixl, tell the decode of each layer landed (protocol
    Landed), so that it scatters the layer during the forward (``pool.scatter_landed``), even
    when its pool is on the prefill's own GPU. Off (default): there the decode scatters the
    whole hand-off once it ends, because each scatter in another process during the forward
    costs the forward two switches of the GPU between the processes (140-180 us each on one
    H200, docs/benchmarks.md). On separate GPUs layers are told either way."""
    post_layers: bool = True
    """With ``layerwise``, through a transport that can (cuda_ipc, tcp): prepare every layer's
    transfer of the last chunk's hand-off at once, and start each from vLLM's own thread as its
    forward passes the layer (cuda_ipc: a launch of a few microseconds; tcp: a queue put for the
    connection's thread), instead of waking the sender's thread per layer, whose work holds the
    GIL that vLLM's thread needs to launch the forward's next kernels (measured in vLLM's engine:
    docs/benchmarks.md), and on CPU shares the forward's core. Not where the decode is told of
    each layer by us (``landed_on_shared_gpu``, or a one-sided transport to another GPU): that
    needs a batch per layer. tcp's receiver sees each layer land by itself."""
    direct: bool = False
    """Direct hand-offs: when the decode's vLLM has allocated the request's blocks by the time the
    prefill's Allocate comes (the proxy's concurrent dispatch), the prefill writes straight into
    them and the decode scatters nothing (one pass instead of two: 0.81x the pool's time for 1 GiB
    on one H200, docs/benchmarks.md). nixl, cuda_ipc and loopback can; tcp refuses it at start.
    Set on both sides."""


class PoolConfig(Section):
    size_mib: Positive = 256
    """Decode-side receive pool, pre-allocated at start, per TP rank."""
    scatter_landed: bool = True
    """Scatter each layer of a hand-off into vLLM's blocks as soon as all its pages landed (a
    layered hand-off's layers during the prefill's forward), not after TransferDone: tcp's
    receiver sees each batch land, over the others the prefill says (protocol Landed)."""


class IntegrityConfig(Section):
    verify: bool = False
    """End-to-end check of every hand-off's bytes: the prefill sends a digest of what it sent
    (a fast non-cryptographic sum over the blocks, digests.cache_digest) and the decode checks the
    pool pages against it before loading; on a mismatch vLLM recomputes the prompt (counted).
    Costs a read of the hand-off's bytes on each side (docs/benchmarks.md)."""


class TimeoutsConfig(Section):
    handshake_s: Seconds = 5.0
    """Prefill waits this long for a decode peer's handshake reply."""
    control_s: Seconds = 5.0
    """Any other control-plane round trip (transfer done, cancel, heartbeat)."""
    alloc_s: Seconds = 10.0
    """Prefill waits this long for decode pool pages (pool full), then gives up: decode recomputes."""
    transfer_s: Seconds = 30.0
    """Decode waits this long for a hand-off to arrive, then recomputes the prompt itself."""
    data_s: Seconds = 30.0
    """Prefill waits this long for the data plane to complete one transfer."""
    lease_s: Seconds = 30.0
    """Pool pages return to the pool when not renewed (heartbeat) or consumed within this time."""
    heartbeat_s: Seconds = 2.0
    """Prefill workers heartbeat every linked decode worker at this interval (renewing the leases
    of in-flight transfers); an unanswered heartbeat (``control_s``) drops the link."""
    direct_wait_s: Seconds = 0.05
    """With ``transport.direct``: a decode worker holds an Allocate whose decode request came at the
    same time up to this long for vLLM to schedule it (the prefill then writes into its blocks)."""
    peer_s: Seconds = 10.0
    """A decode worker forgets a prefill worker it has not heard from for this long (killed, stopped,
    partitioned): its reservations are aborted, their requests recompute without waiting ``transfer_s``."""


class AuthConfig(Section):
    secret_file: str | None = None
    """File holding the deployment's shared secret (at least 16 bytes; surrounding whitespace is
    ignored; ``lmcache-pd secret FILE`` writes one). The environment variable LMCACHE_PD_SECRET
    may hold the secret instead. With neither, every instance and the proxy bind loopback only."""
    encrypt: bool = False
    """Encrypt the control plane (CurveZMQ) and the tcp data plane (AES-256-GCM), with keys derived
    from the secret; the same on every instance. nixl cannot, and refuses it (docs/security.md)."""


class BackpressureConfig(Section):
    prefill_queue: Positive = 64
    """Hand-offs one prefill worker lets wait for pages of one decode instance; beyond it a
    hand-off fails at once (its blocks are freed, the decode side recomputes)."""
    decode_queue: Positive = 256
    """Allocations one decode worker queues while its pool is full; beyond it they are refused."""


class TierConfig(Section):
    name: str
    """A registered cache tier: ``memory``, ``disk``, ``redis`` (Valkey too) or ``server``."""
    options: dict[str, Any] = {}  # validated by the tier's own ``Options`` struct (docs/cache.md)


class CacheConfig(Section):
    enabled: bool = False
    """Keep computed prompt KV in the tiers below and reuse it (docs/cache.md)."""
    chunk_tokens: Positive = 256
    """Tokens per cached chunk (the unit of keys and reuse); a multiple of vLLM's block size."""
    tiers: tuple[TierConfig, ...] = (TierConfig(name="memory"),)
    """Fastest first. Reads go down the tiers and promote hits upward; writes go to all. In the
    file, ``cache.server: <socket>`` puts the node cache daemon's tier first (docs/cache_server.md)."""
    write_queue_mib: Positive = 512
    """Chunk writes waiting for the tiers, at most; a write beyond it is dropped (not cached)."""
    lookup_timeout_s: Seconds = 2.0
    """The scheduler waits this long for the workers to say how much of a prompt is cached,
    then schedules the request without cache hits."""
    hold_s: Seconds = 60.0
    """Chunks a lookup found are kept from eviction until their load ends, or this long at most."""
    decode_skip: bool = True
    """Decode instances tell the prefill side which leading chunks of a prompt their own local
    tiers (memory, disk) hold, and those are not transferred again (docs/cache.md)."""


class CacheServerConfig(Section):
    """This node's cache daemon, as ``lmcache-pd launch --role cache-server`` starts it (docs/cache_server.md)."""
    socket: str
    """Its Unix socket; a ``server`` tier in ``cache.tiers`` without ``options.socket`` uses it."""
    size_mib: Positive = 4096
    slab_mib: Positive = 64
    """Memory is handed to size classes in slabs of this size; a chunk larger than one is not cached."""
    eviction: Literal["lru", "fifo"] = "lru"
    chunk_tokens: Positive | None = None
    """The node's one chunk size: engines with another ``cache.chunk_tokens`` are refused."""
    tiers: tuple[TierConfig, ...] = ()
    """Its own tiers below its memory (disk, redis), as in ``cache.tiers``: written through, read back."""
    host: str = "127.0.0.1"
    http_port: Port | None = None
    """Its ``/metrics`` and ``/cache/*`` (none when unset)."""


class RoutingConfig(Section):
    """How the proxy's routing policy weighs instances (``proxy.policy``; proxy/policies.py)."""

    lookup_timeout_s: Seconds = 0.05
    """Per request, asking the instances what they hold of its prompt (tokenizing a text prompt
    first) waits at most this long; whoever has not answered counts as holding nothing."""
    load_interval_s: Seconds = 0.5
    """How often the proxy reads each instance's load (vLLM's running and waiting requests, the
    decode pool's free pages)."""
    remote_weight: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    """What a prompt token found only in the shared remote tier is worth against one in the
    instance's own tiers (it still crosses the network)."""
    decode_alone_tokens: NonNegative = 0
    """A request of which at most this many prompt tokens are left to compute on the chosen
    decode instance (a short prompt, or one whose history that decode holds) is served by the
    decode alone: no prefill, no hand-off (0: never for that reason)."""
    decode_alone_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    """... or of which the decode instance holds at least this fraction (1.0: never for that
    reason)."""
    decode_max_requests: Positive = 256
    """A decode instance with this many requests running and waiting is overloaded: history
    affinity no longer sends it a conversation's next turn."""
    decode_min_free: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05
    """... nor one whose pool has less than this fraction of its pages free."""


class ProxyConfig(Section):
    host: str = "127.0.0.1"
    port: Port = 8000
    connect_timeout_s: Seconds = 5.0
    prefill_timeout_s: Seconds = 120.0
    """Whole prefill request (compute of the prompt); past it the decode recomputes."""
    decode_timeout_s: Seconds = 600.0
    """Whole decode request (until the last token)."""
    dispatch: Literal["concurrent", "sequential"] = "concurrent"
    """``concurrent``: the decode request is sent together with the prefill request and waits
    for the KV on the decode instance (its HTTP, tokenization and scheduling overlap the
    prefill's compute); ``sequential``: it is sent after the prefill answered."""
    first_token: Literal["prefill", "decode"] = "prefill"
    """Who gives the client its first token. ``prefill``: the prefill's sampled token goes to the
    client as soon as the prefill answers, and the decode continues from it (its prompt is the
    prompt plus that token, whose KV it computes; it computes no prompt token). ``decode``: the
    decode recomputes the last prompt token and samples the first token itself. Requests the
    proxy cannot continue exactly (chat, stop strings, bad words, seeds, presence or frequency
    penalties, structured output; docs/config.md) take the ``decode`` path, as ``dispatch`` says."""
    health_interval_s: Seconds = 2.0
    max_body_mib: Positive = 32
    """Largest request body the proxy reads (a larger one is answered 413, unread)."""
    handoff_report: bool = False
    """Diagnostics: put the decode's hand-off report (loaded or not, bytes, times, the error) of a
    non-streamed answer into the header ``x-lmcache-pd-handoff``. Off: answers carry nothing of
    the hand-off (transfer ids and error texts are for operators; the hand-off log has them)."""
    prefills: tuple[str, ...] = ()
    """Names of the prefill instances this proxy routes to (empty: all of them)."""
    decodes: tuple[str, ...] = ()
    """Names of the decode instances this proxy routes to (empty: all of them)."""
    policy: str = "round_robin"
    """Which prefill and decode serve each request (proxy/policies.py): ``round_robin``,
    ``kv_aware`` (the prefill that holds most of the prompt against its queued prefill work; the
    decode that holds the conversation's history unless overloaded, else the least loaded; the
    decode alone where ``routing`` says), or ``module:Class`` of your own (a ``Policy``)."""
    routing: RoutingConfig = RoutingConfig()
