"""ClusterKV (Liu et al., DAC'25, arXiv 2412.03213): recall by semantic clusters of the prompt's keys.

At prefill the keys of prompt positions ``[sinks, T)`` of each KV head are grouped by k-means. At each
decode step a query head ranks the clusters of its KV head by ``q . centroid``, takes clusters in that
order until their members cover ``budget - sinks`` tokens and truncates the last one to exactly that
many. Sinks ``[0, sinks)`` and every generated token ``[T, n)`` are always attended.

Conventions (each a parameter or stated here; docs/cluster_retrieval.md has the full list):

* State: ``ClusterKV`` is a StatefulMethod. ``prefill`` runs the k-means (``kmeans``, public) and
  keeps the clustering and the cache in a ``ClusterKVState``; ``decode`` appends the new token, then
  selects with ``cluster_select`` (public, pure) and attends. Selections index original positions.
* k-means: ``iterations`` Lloyd steps exactly (no early stop). Initialisation ``"random"`` picks
  ``C`` distinct keys with ``numpy.random.default_rng(seed).choice(m, C, replace=False)``, sorted by
  position (cluster ``j`` starts at the ``j``-th smallest chosen position); ``"kmeans++"`` is
  sequential D^2 sampling from the same generator. ``C = min(n_clusters, m)`` for ``m`` clusterable
  keys. Assignment: ``metric="cosine"`` (the repo's default) maximises the cosine similarity (a zero
  vector has similarity 0 with everything), ``"l2"`` minimises ``|c|^2 - 2 x.c``; ties go to the lower
  cluster id. Update: each centroid becomes the mean of its members' raw keys, so ``q . c`` is the
  mean logit (times sqrt(d)) of the cluster; an empty cluster keeps its previous centroid. Labels
  are those of the last assignment (the centroids are exactly their means) unless ``reassign``.
* Ranking: ``q . c`` unscaled, descending; equal scores: lower cluster id first (core.topk_indices).
  Members of a cluster are taken in ascending position, so truncation keeps the *earliest* tokens
  of the last cluster (the repo's order: ``torch.where`` over the label array).
* Budget: counts the sinks and not the generated tokens; ``r = clip(budget - sinks, 0, m)`` clustered
  tokens are selected, so a head attends ``min(sinks, T) + r + (n - T)`` tokens. ``budget >= T``
  selects every prompt token (dense), as the repo's fallback does. ``budget < sinks`` selects no
  clustered token (the sinks are still attended).
* GQA: ``gqa="per_query_head"`` (repo default: centroids repeated to query heads, each query head
  ranks with its own query); ``"mean_query"`` ranks with the group's mean query (the repo's
  unfinished ``qavg`` option), one selection per KV head.
* Traffic (HBM, everything resident as in the repo's accuracy path): the selected K/V rows
  (``kv_traffic``), plus metadata: each scoring read of the centroids (``C * d`` elements at the
  layout's element size) and cluster sizes (``C`` int32), and one int64 member index per selected
  clustered token. Under ``share_kv_heads`` a KV head's centroids are read once for its group and the
  member indices of the union of its group's selections once; otherwise per query head. No centroid
  is read when nothing is ranked (no clustered token taken, or all of them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..registry import register_method
from . import core
from .method import StatefulMethod, check_sequence, decode_scale, prefill_scale
from .types import Layout, Selection, StepResult, Traffic, kv_traffic

METRICS = ("cosine", "l2")
INITS = ("random", "kmeans++")
GQA_POLICIES = ("per_query_head", "mean_query")
CLUSTER_SIZE_BYTES = 4     # int32 cluster sizes / prefix sums, as the repo stores them
MEMBER_INDEX_BYTES = 8     # int64 token index per cluster member, as the repo stores them


# --------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KMeansResult:
    """``centroids [C, d]`` and ``labels [m]`` (cluster id of each input row)."""

    centroids: np.ndarray
    labels: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.centroids.shape[0]).astype(np.int64)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def assign(x: np.ndarray, centroids: np.ndarray, metric: str = "cosine", *, x_unit: np.ndarray | None = None,
           out: np.ndarray | None = None) -> np.ndarray:
    """Cluster id of each row of ``x``: best centroid under ``metric``, lower id on ties.

    ``x_unit`` (the rows of ``x`` scaled to unit norm) may be passed to save recomputing it, and
    ``out`` (``[m, C]`` float64) to hold the similarity matrix without allocating it again.
    """
    if metric == "cosine":
        xu = _unit_rows(x) if x_unit is None else x_unit
        return np.argmax(np.matmul(xu, _unit_rows(centroids).T, out=out), axis=1).astype(np.int64)
    if metric == "l2":
        # |x|^2 is the same for every centroid: leaving it out keeps the argmin
        dots = np.matmul(x, centroids.T, out=out)
        return np.argmin((centroids ** 2).sum(axis=1)[None, :] - 2.0 * dots, axis=1).astype(np.int64)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _member_means(x: np.ndarray, labels: np.ndarray, previous: np.ndarray) -> np.ndarray:
    c = previous.shape[0]
    counts = np.bincount(labels, minlength=c)
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = previous.copy()                       # an empty cluster keeps its previous centroid
    nonempty = counts > 0
    # empty clusters have zero-length segments, so reducing at the non-empty starts sums each cluster
    sums = np.add.reduceat(x[order], starts[nonempty], axis=0)
    out[nonempty] = sums / counts[nonempty, None]
    return out


def _init_centroids(x: np.ndarray, c: int, init: str, rng: np.random.Generator, metric: str) -> np.ndarray:
    m = x.shape[0]
    if init == "random":
        return x[np.sort(rng.choice(m, size=c, replace=False))].copy()
    if init == "kmeans++":
        pts = _unit_rows(x) if metric == "cosine" else x
        chosen = [int(rng.integers(m))]
        d2 = ((pts - pts[chosen[0]]) ** 2).sum(axis=1)
        for _ in range(1, c):
            d2[chosen] = 0.0
            total = d2.sum()
            if total > 0:
                nxt = int(rng.choice(m, p=d2 / total))
            else:  # every remaining point coincides with a chosen one: pick uniformly among the rest
                rest = np.setdiff1d(np.arange(m), chosen)
                nxt = int(rng.choice(rest))
            chosen.append(nxt)
            d2 = np.minimum(d2, ((pts - pts[nxt]) ** 2).sum(axis=1))
        return x[np.array(chosen)].copy()
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def kmeans(x, n_clusters: int, *, iterations: int = 20, seed: int = 0, metric: str = "cosine",
           init: str = "random", reassign: bool = False) -> KMeansResult:
    """Deterministic Lloyd k-means of the rows of ``x [m, d]`` (see the module doc for every rule).

    ``C = min(n_clusters, m)`` clusters; ``m = 0`` gives an empty result. Same arguments, same result.
    """
    x = core.as_float64(x, "x", ndim=2)
    n_clusters = core.check_positive_int(n_clusters, "n_clusters")
    iterations = core.check_positive_int(iterations, "iterations")
    seed = core.check_positive_int(seed, "seed", allow_zero=True)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    m, d = x.shape
    c = min(n_clusters, m)
    if c == 0:
        return KMeansResult(np.zeros((0, d)), np.zeros(0, dtype=np.int64))
    rng = np.random.default_rng(seed)
    centroids = _init_centroids(x, c, init, rng, metric)
    x_unit = _unit_rows(x) if metric == "cosine" else None
    scratch = np.empty((m, c))
    for _ in range(iterations):
        labels = assign(x, centroids, metric, x_unit=x_unit, out=scratch)
        centroids = _member_means(x, labels, centroids)
    if reassign:
        labels = assign(x, centroids, metric, x_unit=x_unit, out=scratch)
    return KMeansResult(centroids, labels)


# --------------------------------------------------------------------------------------------
# state and selection
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterKVState:
    """What ClusterKV keeps after prefill: the clustering per KV head and the cache.

    ``centroids [H_kv, C, d]``; ``labels [H_kv, m]`` is the cluster of prompt position ``first + j``
    (``first = min(sinks, T)``, ``m = T - first``). The cache is kept as the prompt's
    ``prompt_k``/``prompt_v`` ``[H_kv, T, d]`` (never copied by ``decode``) and the generated tokens'
    ``gen_k``/``gen_v`` ``[H_kv, n - T, d]``; ``rows`` gathers any positions from both. ``scale``
    (keyword-only) is the softmax scale prefill was given, used by every decode step's attention
    (``None`` in a state built by hand: ``1/sqrt(d)``, or whatever decode is given).
    """

    prompt_len: int
    first: int
    centroids: np.ndarray
    labels: np.ndarray
    prompt_k: np.ndarray
    prompt_v: np.ndarray
    gen_k: np.ndarray
    gen_v: np.ndarray
    scale: float | None = field(default=None, kw_only=True)

    @property
    def n(self) -> int:
        return self.prompt_len + self.gen_k.shape[1]

    def rows(self, positions: np.ndarray, kv_head: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values ``[H_kv, len(positions), d]`` (or ``[len, d]`` of one ``kv_head``) at sorted positions."""
        heads = slice(None) if kv_head is None else kv_head
        split = int(np.searchsorted(positions, self.prompt_len))
        old, new = positions[:split], positions[split:] - self.prompt_len
        k = np.concatenate([self.prompt_k[heads][..., old, :], self.gen_k[heads][..., new, :]], axis=-2)
        v = np.concatenate([self.prompt_v[heads][..., old, :], self.gen_v[heads][..., new, :]], axis=-2)
        return k, v

    @property
    def k(self) -> np.ndarray:
        """The whole cache's keys ``[H_kv, n, d]`` (a copy: for checks, not for the decode path)."""
        return self.rows(np.arange(self.n))[0]

    @property
    def v(self) -> np.ndarray:
        return self.rows(np.arange(self.n))[1]

    def members(self, kv_head: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the clustered tokens grouped by cluster (ascending inside each) and each
        cluster's offset into that list (``[C + 1]``)."""
        labels = self.labels[kv_head]
        counts = np.bincount(labels, minlength=self.centroids.shape[1])
        order = np.argsort(labels, kind="stable") + self.first
        return order, np.concatenate([[0], np.cumsum(counts)])


def clustered_budget(budget: int, sinks: int, m: int) -> int:
    """Clustered tokens a head selects: ``clip(budget - sinks, 0, m)``."""
    return int(min(max(budget - sinks, 0), m))


def cluster_select(q, state: ClusterKVState, *, budget: int, sinks: int,
                   gqa: str = "per_query_head") -> Selection:
    """Per query head: sinks + the first ``budget - sinks`` members of the ranked clusters + generated."""
    q = core.as_float64(q, "q", ndim=2)
    h_q, d = q.shape
    h_kv = state.centroids.shape[0]
    g = core.group_size(h_q, h_kv)
    if gqa not in GQA_POLICIES:
        raise ValueError(f"gqa must be one of {GQA_POLICIES}, got {gqa!r}")
    m = state.labels.shape[1]
    r = clustered_budget(budget, sinks, m)
    always = np.concatenate([np.arange(state.first), np.arange(state.prompt_len, state.n)]).astype(np.int64)
    queries = q if gqa == "per_query_head" else np.repeat(q.reshape(h_kv, g, d).mean(axis=1), g, axis=0)
    indices = []
    member_lists = [state.members(j) for j in range(h_kv)]
    for h in range(h_q):
        kv = h // g
        members, offsets = member_lists[kv]
        if r == m:
            chosen = members
        elif r == 0:
            chosen = members[:0]
        else:
            ranked = core.topk_indices(state.centroids[kv] @ queries[h], state.centroids.shape[1])
            covered = np.cumsum(offsets[ranked + 1] - offsets[ranked])
            n_take = int(np.searchsorted(covered, r, side="left")) + 1   # shortest prefix covering r
            chosen = np.concatenate([members[offsets[c]:offsets[c + 1]] for c in ranked[:n_take]])[:r]
        indices.append(np.concatenate([always, chosen]))
    return Selection(tuple(indices), state.n)


def attend_selected_rows(q: np.ndarray, state: ClusterKVState, selection: Selection, *,
                         scale: float | None = None) -> np.ndarray:
    """``core.attend_indices`` over the whole cache, computed on the gathered rows of each KV head's
    group only: rows keep their position order, so every sum runs in the same order."""
    h_kv, _, d = state.prompt_k.shape
    unions = selection.kv_union(h_kv)
    width = max(u.size for u in unions)
    k_rows, v_rows = np.zeros((h_kv, width, d)), np.zeros((h_kv, width, d))  # rows past a head's union are never read
    for j, u in enumerate(unions):
        k_rows[j, :u.size], v_rows[j, :u.size] = state.rows(u, j)
    g = core.group_size(selection.h_q, h_kv)
    local = [np.searchsorted(unions[h // g], ix) for h, ix in enumerate(selection.indices)]
    return core.attend_indices(q, k_rows, v_rows, local, scale=scale)


def cluster_traffic(selection: Selection, state: ClusterKVState, *, layout: Layout = Layout()) -> Traffic:
    """Selected K/V rows plus centroid, cluster-size and member-index reads (module doc)."""
    h_kv, c, d = state.centroids.shape
    kv = kv_traffic(selection, h_kv, d, layout)
    clustered = [ix[(ix >= state.first) & (ix < state.prompt_len)] for ix in selection.indices]
    if layout.share_kv_heads:
        scorers = h_kv
        g = core.group_size(selection.h_q, h_kv)
        index_rows = sum(np.unique(np.concatenate(clustered[j * g:(j + 1) * g])).size for j in range(h_kv))
    else:
        scorers = selection.h_q
        index_rows = sum(ix.size for ix in clustered)
    if all(ix.size in (0, state.labels.shape[1]) for ix in clustered):
        scorers = 0   # nothing to rank: no clustered token is taken, or all of them are
    per_scorer = c * layout.row_bytes(d) + c * CLUSTER_SIZE_BYTES
    meta = Traffic({("hbm", "metadata"): scorers * per_scorer + index_rows * MEMBER_INDEX_BYTES}, layout)
    return kv + meta


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------

@register_method
@dataclass(frozen=True)
class ClusterKV(StatefulMethod):
    """Hyper-parameters of ClusterKV; defaults are the repo's (``accuracy/patch.py``)."""

    name = "clusterkv"
    family = "dynamic"
    summary = "k-means of prompt keys; attend the top-ranked clusters up to a token budget + sinks + generated"

    n_clusters: int = 400
    sinks: int = 16
    budget: int = 1024
    iterations: int = 20
    seed: int = 0
    metric: str = "cosine"
    init: str = "random"
    reassign: bool = False
    gqa: str = "per_query_head"

    def __post_init__(self):
        core.check_positive_int(self.n_clusters, "n_clusters")
        core.check_positive_int(self.sinks, "sinks", allow_zero=True)
        core.check_positive_int(self.budget, "budget", allow_zero=True)
        core.check_positive_int(self.iterations, "iterations")
        core.check_positive_int(self.seed, "seed", allow_zero=True)
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.reassign, bool):
            raise TypeError(f"reassign must be a bool, got {type(self.reassign).__name__}")
        if self.gqa not in GQA_POLICIES:
            raise ValueError(f"gqa must be one of {GQA_POLICIES}, got {self.gqa!r}")

    def cluster(self, k_prompt) -> list[KMeansResult]:
        """The k-means of each KV head's prompt keys ``k_prompt [T, H_kv, d]``, sinks excluded."""
        k_prompt = core.as_float64(k_prompt, "k_prompt", ndim=3)
        first = min(self.sinks, k_prompt.shape[0])
        return [kmeans(k_prompt[first:, j], self.n_clusters, iterations=self.iterations, seed=self.seed,
                       metric=self.metric, init=self.init, reassign=self.reassign)
                for j in range(k_prompt.shape[1])]

    def prefill(self, q_prompt, k_prompt, v_prompt, *, scale: float | None = None) -> ClusterKVState:
        """Cluster the prompt's keys. Ranking (``q . c``) is unscaled; ``scale`` is stored for decode."""
        q_prompt, k_prompt, v_prompt = check_sequence(q_prompt, k_prompt, v_prompt)
        t, h_kv, d = k_prompt.shape
        scale = prefill_scale(scale, d)
        first = min(self.sinks, t)
        fits = self.cluster(k_prompt)
        return ClusterKVState(
            prompt_len=t, first=first,
            centroids=np.stack([f.centroids for f in fits]).reshape(h_kv, -1, d),
            labels=np.stack([f.labels for f in fits]).reshape(h_kv, t - first),
            prompt_k=np.ascontiguousarray(k_prompt.transpose(1, 0, 2)),
            prompt_v=np.ascontiguousarray(v_prompt.transpose(1, 0, 2)),
            gen_k=np.zeros((h_kv, 0, d)), gen_v=np.zeros((h_kv, 0, d)), scale=scale)

    def decode(self, state: ClusterKVState, q, k_new, v_new, *, scale: float | None = None,
               layout: Layout = Layout()) -> tuple[ClusterKVState, StepResult]:
        if not isinstance(state, ClusterKVState):
            raise TypeError(f"state must be a ClusterKVState (from prefill), got {type(state).__name__}")
        h_kv, _, d = state.prompt_k.shape
        q = core.as_float64(q, "q", ndim=2)
        k_new = core.as_float64(k_new, "k_new", ndim=2)
        v_new = core.as_float64(v_new, "v_new", ndim=2)
        if k_new.shape != (h_kv, d) or v_new.shape != (h_kv, d):
            raise ValueError(f"k_new and v_new must have shape (H_kv, d) = {(h_kv, d)}, got {k_new.shape}, {v_new.shape}")
        if q.shape[1] != d or q.shape[0] % h_kv:
            raise ValueError(f"q must have shape (H_q, {d}) with H_q a multiple of H_kv={h_kv}, got {q.shape}")
        scale = decode_scale(state.scale, scale)
        state = ClusterKVState(state.prompt_len, state.first, state.centroids, state.labels,
                               state.prompt_k, state.prompt_v,
                               np.concatenate([state.gen_k, k_new[:, None]], axis=1),
                               np.concatenate([state.gen_v, v_new[:, None]], axis=1), scale=state.scale)
        selection = cluster_select(q, state, budget=self.budget, sinks=self.sinks, gqa=self.gqa)
        output = attend_selected_rows(q, state, selection, scale=scale)
        return state, StepResult(selection, output, cluster_traffic(selection, state, layout=layout))

    def select(self, q, k, v, *, positions=None) -> Selection:
        raise NotImplementedError("ClusterKV is stateful: use prefill() then decode(), or run_decode()")

    @classmethod
    def presets(cls) -> dict[str, "ClusterKV"]:
        return {
            "canonical": cls(),
            # RAFT's fit (k-means++ style init, then the repo re-assigns every key to its nearest
            # centroid by cosine); RAFT's own init and early stop are not reproduced bit for bit
            "clusterkv-repo": cls(init="kmeans++", reassign=True),
        }
