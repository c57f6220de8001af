"""Element rules inside the Triton kernels: the switch ``_predicate`` on the rule's ``kernel_id``.

Each branch reads its rule's packed int parameters from ``pred_ptr`` in the order of the rule's
``pack()`` (``diffattn.rules``): the grid first (video start, video tokens, F, Y, X), then the
rule's own. Adding a rule is one ``@triton.jit`` function here and one ``elif`` in ``_predicate``;
its torch twin lives beside its dataclass in ``diffattn/rules/``.
"""

import triton
import triton.language as tl


@triton.jit
def _na_dim(cq, ck, length, k, s, d, causal):
    # NATTEN window along one dimension (diffattn/rules/neighborhood.py `window`), per element
    group = cq % d
    w = cq // d
    glen = (length - group + d - 1) // d
    lo_causal = tl.maximum(tl.minimum((w // s) * s + s - 1, glen - 1) - k + 1, 0)
    leader = tl.minimum((w // s) * s + s // 2, glen - 1)
    lo = tl.minimum(tl.maximum(leader - k // 2, 0), glen - k)
    lo = tl.where(causal != 0, lo_causal, lo)
    hi = tl.where(causal != 0, w, lo + k - 1)
    wk = ck // d
    return (ck % d == group) & (wk >= lo) & (wk <= hi)


@triton.jit
def _neighborhood(fq, fk, yq, yk, xq, xk, nf, ny, nx, pred_ptr):
    # NeighborhoodRule.pack(): [5:8] kernel, [8:11] stride, [11:14] dilation, [14:17] causal (F, Y, X)
    ok = _na_dim(fq, fk, nf, tl.load(pred_ptr + 5), tl.load(pred_ptr + 8), tl.load(pred_ptr + 11), tl.load(pred_ptr + 14))
    ok = ok & _na_dim(yq, yk, ny, tl.load(pred_ptr + 6), tl.load(pred_ptr + 9), tl.load(pred_ptr + 12), tl.load(pred_ptr + 15))
    ok = ok & _na_dim(xq, xk, nx, tl.load(pred_ptr + 7), tl.load(pred_ptr + 10), tl.load(pred_ptr + 13), tl.load(pred_ptr + 16))
    return ok


@triton.jit
def _circle(fq, fk, yq, yk, xq, xk, pred_ptr):
    # CircleRule.pack(): [5] r^2
    dy = yq - yk
    dx = xq - xk
    return (fq == fk) & (dy * dy + dx * dx < tl.load(pred_ptr + 5))


@triton.jit
def _tiled_coords(r, nf, ny, nx, tile_ptr):
    # a tiled rule's pack() tail at tile_ptr: [0:3] tile (tf, ty, tx), [3] tiles along Y, [4] along
    # X (diffattn/rules/grid.py `tiled_coords`); returns (f, y, x) and whether the token is padding
    tf = tl.load(tile_ptr + 0)
    ty = tl.load(tile_ptr + 1)
    tx = tl.load(tile_ptr + 2)
    n_ty = tl.load(tile_ptr + 3)
    n_tx = tl.load(tile_ptr + 4)
    volume = tf * ty * tx
    tile = r // volume
    inner = r % volume
    f = (tile // (n_ty * n_tx)) * tf + inner // (ty * tx)
    y = ((tile // n_tx) % n_ty) * ty + (inner // tx) % ty
    x = (tile % n_tx) * tx + inner % tx
    return f, y, x, (f >= nf) | (y >= ny) | (x >= nx)


@triton.jit
def _predicate(qi, ki, pred_ptr, PREDICATE: tl.constexpr):
    """Element rule of partial blocks, by kernel_id (1: neighborhood, 2: circle, 3: neighborhood on
    tiled tokens, 4: circle on tiled tokens); qi, ki broadcast.

    pred_ptr [0:5] is the grid (GridRule.pack_grid): video start, video tokens, F, Y, X.
    """
    v0 = tl.load(pred_ptr + 0)
    n = tl.load(pred_ptr + 1)
    nf = tl.load(pred_ptr + 2)
    ny = tl.load(pred_ptr + 3)
    nx = tl.load(pred_ptr + 4)
    rq = qi - v0
    rk = ki - v0
    video_q = (rq >= 0) & (rq < n)
    text_k = (rk < 0) | (rk >= n)
    text = ~video_q | text_k  # text tokens are global
    rq = tl.minimum(tl.maximum(rq, 0), n - 1)
    rk = tl.minimum(tl.maximum(rk, 0), n - 1)
    if PREDICATE == 3 or PREDICATE == 4:
        tail = 17 if PREDICATE == 3 else 7  # where the rule's tile parameters start
        fq, yq, xq, pad_q = _tiled_coords(rq, nf, ny, nx, pred_ptr + tail)
        fk, yk, xk, pad_k = _tiled_coords(rk, nf, ny, nx, pred_ptr + tail)
    else:
        per_frame = ny * nx
        fq = rq // per_frame
        fk = rk // per_frame
        yq = (rq % per_frame) // nx
        yk = (rk % per_frame) // nx
        xq = rq % nx
        xk = rk % nx
    if PREDICATE == 1 or PREDICATE == 3:
        ok = _neighborhood(fq, fk, yq, yk, xq, xk, nf, ny, nx, pred_ptr)
    else:
        ok = _circle(fq, fk, yq, yk, xq, xk, pred_ptr)
    ok = ok | text
    if PREDICATE == 3 or PREDICATE == 4:
        ok = ok & ~(pad_k & ~text_k)  # padding keys of the tiles
    if PREDICATE == 2 or PREDICATE == 4:
        # CircleRule.pack() [6]: first pooled token (-1: none); pooled keys serve image queries only
        ps = tl.load(pred_ptr + 6)
        pooled_q = (ps >= 0) & (qi >= ps)
        pooled_k = (ps >= 0) & (ki >= ps)
        ok = tl.where(pooled_k, video_q | pooled_q, ok & ~pooled_q)
    return ok
