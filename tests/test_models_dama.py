"""The DAMA model: masking invariants, losses against independent computations, gradients, shapes."""
import numpy as np
import pytest
import torch

import models_dama
from models_dama import adaptive_masking, random_masking


def _masks(n, num_patches, mask_ratio, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = models_dama.num_visible_patches(num_patches, mask_ratio)
    mask1, _, _ = random_masking(n, num_patches, k, generator=gen)
    loss1 = torch.rand(n, num_patches, generator=gen)
    return mask1, loss1, k, gen


@pytest.mark.parametrize("n,num_patches,ratio,overlap", [
    (4, 196, 0.8, 0.5), (8, 64, 0.8, 0.5), (3, 64, 0.75, 0.25), (5, 49, 0.6, 0.0), (2, 16, 0.75, 1.0),
    (6, 100, 0.9, 0.5)])
def test_adaptive_masking_invariants(n, num_patches, ratio, overlap):
    mask1, loss1, k, gen = _masks(n, num_patches, ratio)
    mask2, ids_shuffle2, ids_restore2 = adaptive_masking(mask1, loss1, overlap, generator=gen)
    num_overlap = int(k * overlap)
    num_hard = num_patches - 2 * k
    for row in range(n):
        m1, m2, loss = mask1[row].numpy(), mask2[row].numpy(), loss1[row].numpy()
        visible1, visible2 = set(np.flatnonzero(m1 == 0)), set(np.flatnonzero(m2 == 0))
        hidden1 = np.flatnonzero(m1 == 1)
        assert len(visible1) == k and len(visible2) == k
        assert len(visible1 & visible2) == num_overlap
        # Student 1's hidden patches sorted by loss: the hardest H+O are hidden from student 2,
        # the easiest K-O are visible to it.
        by_loss = hidden1[np.argsort(loss[hidden1])]
        easiest, hardest = set(by_loss[:k - num_overlap]), set(by_loss[k - num_overlap:])
        assert len(hardest) == num_hard + num_overlap
        assert visible2 - visible1 == easiest
        assert hardest.isdisjoint(visible2)
        # The tokens given to student 2's encoder are exactly its zeros, and ids_restore inverts ids_shuffle.
        assert set(ids_shuffle2[row, :k].tolist()) == visible2
        assert torch.equal(ids_shuffle2[row][ids_restore2[row]], torch.arange(num_patches))


def test_overlap_is_a_random_subset_independent_per_sample():
    n, num_patches = 4, 64
    mask1_row, loss1_row, k, gen = _masks(1, num_patches, 0.8)
    mask1, loss1 = mask1_row.repeat(n, 1), loss1_row.repeat(n, 1)  # identical samples
    visible1 = set(np.flatnonzero(mask1_row[0].numpy() == 0))
    chosen, rows_differ = set(), 0
    for _ in range(200):
        mask2, _, _ = adaptive_masking(mask1, loss1, 0.5, generator=gen)
        shared = [frozenset(np.flatnonzero((mask1[r] == 0) & (mask2[r] == 0)).tolist()) for r in range(n)]
        chosen.update(*shared)
        rows_differ += len(set(shared)) > 1
    assert chosen == visible1, "every visible patch of student 1 must be chosen for the overlap at some draw"
    assert rows_differ > 190, "identical samples must draw their overlaps independently"


def test_random_sampling_keeps_counts_but_ignores_the_loss():
    n, num_patches, overlap = 64, 64, 0.5
    mask1, loss1, k, gen = _masks(n, num_patches, 0.8)
    mask2, ids_shuffle2, _ = adaptive_masking(mask1, loss1, overlap, sampling="random", generator=gen)
    num_overlap = int(k * overlap)
    assert ((mask2 == 0).sum(1) == k).all()
    assert (((mask1 == 0) & (mask2 == 0)).sum(1) == num_overlap).all()
    assert torch.equal(mask2.gather(1, ids_shuffle2[:, :k]), torch.zeros(n, k))
    # Adaptive picks the lowest-loss hidden patches; random must not (compare mean loss of the picks).
    picked_random = (mask1 == 1) & (mask2 == 0)
    mask2_adaptive, _, _ = adaptive_masking(mask1, loss1, overlap, generator=gen)
    picked_adaptive = (mask1 == 1) & (mask2_adaptive == 0)
    mean_random = loss1[picked_random].mean()
    mean_adaptive = loss1[picked_adaptive].mean()
    assert mean_adaptive < 0.15 and 0.35 < mean_random < 0.65


@pytest.mark.parametrize("img_size,num_patches,k,num_hard,num_overlap", [(224, 196, 39, 118, 19), (128, 64, 12, 40, 6)])
def test_worked_example_of_the_spec(img_size, num_patches, k, num_hard, num_overlap):
    mask1, loss1, k_found, gen = _masks(2, num_patches, 0.8)
    assert k_found == k and num_patches - 2 * k == num_hard and int(k * 0.5) == num_overlap
    mask2, _, _ = adaptive_masking(mask1, loss1, 0.5, generator=gen)
    hidden1, hidden2 = mask1 == 1, mask2 == 1
    # Student 2 sees K-O (20 or 6) of student 1's hidden patches plus O of its visible ones ...
    assert ((hidden1 & ~hidden2).sum(1) == k - num_overlap).all()
    assert ((~hidden1 & ~hidden2).sum(1) == num_overlap).all()
    # ... and hides the H+O hardest plus the K-O of student 1's visible patches it does not share.
    assert ((hidden1 & hidden2).sum(1) == num_hard + num_overlap).all()
    assert ((~hidden1 & hidden2).sum(1) == k - num_overlap).all()
    model = models_dama.build_model("main_vit_tiny", img_size=img_size, in_chans=1, mask_ratio=0.8, mask_overlap_ratio=0.5)
    assert (model.num_patches, model.num_visible, model.num_overlap) == (num_patches, k, num_overlap)


def test_patchify_order_is_row_col_channel():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = models_dama.patchify(imgs, 4)  # [2, 4, 48]
    for n in range(2):
        for gi in range(2):
            for gj in range(2):
                expected = [imgs[n, c, gi * 4 + r, gj * 4 + q] for r in range(4) for q in range(4) for c in range(3)]
                assert patches[n, gi * 2 + gj].tolist() == torch.stack(expected).tolist()
    assert torch.equal(models_dama.unpatchify(patches, 4, 3), imgs)


def _numpy_recon_loss(imgs, pred, mask, p, norm_pix):
    n, c, h, w = imgs.shape
    g = h // p
    total, count = 0.0, 0.0
    for i in range(n):
        for gi in range(g):
            for gj in range(g):
                patch = imgs[i, :, gi * p:(gi + 1) * p, gj * p:(gj + 1) * p].transpose(1, 2, 0).reshape(-1)
                if norm_pix:
                    patch = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
                err = np.mean((pred[i, gi * g + gj] - patch) ** 2)
                total += err * mask[i, gi * g + gj]
                count += mask[i, gi * g + gj]
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_recon_loss_matches_a_straightforward_computation(norm_pix):
    torch.manual_seed(0)
    model = models_dama.DAMA(img_size=16, patch_size=4, in_chans=2, embed_dim=32, depth=2, num_heads=2,
                             decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, last_k_blocks=1,
                             norm_pix_loss=norm_pix)
    imgs = torch.rand(3, 2, 16, 16)
    out = model(imgs, generator=torch.Generator().manual_seed(1))
    for student in (1, 2):
        expected = _numpy_recon_loss(imgs.numpy().astype(np.float64), out[f"pred{student}"].detach().double().numpy(),
                                     out[f"mask{student}"].numpy(), 4, norm_pix)
        assert out[f"loss_recon{student}"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss"].item() == pytest.approx(
        (out["loss_info"] + out["loss_recon1"] + out["loss_recon2"]).item(), rel=1e-6)


def _numpy_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("beta,alpha,reduction", [(2.0, 1.0, "sum"), (0.0, 1.0, "sum"), (0.5, 0.3, "sum"), (2.0, 1.0, "mean")])
def test_regression_loss_matches_a_straightforward_computation(beta, alpha, reduction):
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(2, 5, 8)) * 3 + 1 for _ in range(3)]
    pred = _numpy_softmax(rng.normal(size=(2, 5, 8)))
    # Reference: layer-norm each block's feature without affine, average, softmax over D.
    normed = [(f - f.mean(-1, keepdims=True)) / np.sqrt(f.var(-1, keepdims=True) + 1e-5) for f in feats]
    target = _numpy_softmax(sum(normed) / len(normed))
    diff = np.abs(pred - target)
    if beta == 0:
        elementwise = diff ** 2
    else:
        elementwise = np.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta)
    per_token = elementwise.sum(-1)
    expected = alpha * (per_token.sum() if reduction == "sum" else per_token.mean())

    target_t = models_dama.regression_target([torch.tensor(f, dtype=torch.float32) for f in feats])
    np.testing.assert_allclose(target_t.numpy(), target, rtol=1e-4, atol=1e-6)
    got = models_dama.info_loss(torch.tensor(pred, dtype=torch.float32), target_t, beta, alpha, reduction)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_info_loss_uses_student2_last_k_mlp_outputs_and_student1_head():
    """Rebuild the info loss of a forward pass from the students' own modules, block by block."""
    torch.manual_seed(0)
    model = models_dama.DAMA(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=3, num_heads=2,
                             decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, last_k_blocks=2)
    imgs = torch.rand(2, 1, 16, 16)
    out = model(imgs, generator=torch.Generator().manual_seed(3))
    k = model.num_visible

    def encode(student, ids_keep):
        x = student.patch_embed(imgs) + student.pos_embed[:, 1:]
        x = torch.stack([x[i, ids_keep[i]] for i in range(len(imgs))])
        x = torch.cat([(student.cls_token + student.pos_embed[:, :1]).expand(len(imgs), -1, -1), x], 1)
        mlp_outs = []
        for block in student.blocks:
            h = x + block.attn(block.norm1(x))
            mlp_outs.append(block.mlp(block.norm2(h)))
            x = h + mlp_outs[-1]
        return student.norm(x), mlp_outs

    latent1, _ = encode(model.student1, out["ids_shuffle1"][:, :k])
    _, mlp_outs2 = encode(model.student2, out["ids_shuffle2"][:, :k])
    target = models_dama.regression_target(mlp_outs2[-2:])
    expected = models_dama.info_loss(model.head(latent1), target, 2.0, 1.0)
    assert out["loss_info"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_aligned_pairing_pairs_cls_and_shared_patches():
    n, num_patches = 3, 64
    mask1, loss1, k, gen = _masks(n, num_patches, 0.8)
    ids_shuffle1 = torch.argsort(mask1 + torch.rand(n, num_patches, generator=gen) * 0.5, dim=1)
    ids_restore1 = torch.argsort(ids_shuffle1, dim=1)
    _, ids_shuffle2, _ = adaptive_masking(mask1, loss1, 0.5, generator=gen)
    pos1, pos2 = models_dama.shared_token_pairs(ids_restore1, ids_shuffle2, mask1, k, int(k * 0.5))
    assert pos1.shape == (n, 1 + int(k * 0.5)) and (pos1[:, 0] == 0).all() and (pos2[:, 0] == 0).all()
    patch1 = ids_shuffle1.gather(1, pos1[:, 1:] - 1)
    patch2 = ids_shuffle2.gather(1, pos2[:, 1:] - 1)
    assert torch.equal(patch1, patch2)
    assert (mask1.gather(1, patch1) == 0).all()


def test_gradients_reach_every_trainable_parameter_and_pos_embeds_stay_fixed():
    torch.manual_seed(0)
    model = models_dama.build_model("main_vit_tiny", img_size=32, patch_size=8, in_chans=3, info_pairing="aligned")
    fixed = {name: p.detach().clone() for name, p in model.named_parameters() if "pos_embed" in name}
    assert len(fixed) == 4 and all(not model.get_parameter(n).requires_grad for n in fixed)
    out = model(torch.rand(2, 3, 32, 32))
    out["loss"].backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert any(n.startswith("head.") for n, _ in trainable)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    optimizer.step()
    for name, before in fixed.items():
        assert torch.equal(model.get_parameter(name), before)


def test_students_are_independent():
    model = models_dama.build_model("main_vit_tiny", img_size=32, patch_size=8, in_chans=7)
    assert not torch.equal(model.student1.blocks[0].attn.qkv.weight, model.student2.blocks[0].attn.qkv.weight)


FORWARD_CASES = [("main_vit_tiny", c, s) for c in (1, 3, 7) for s in (32, 64, 224)] + [
    ("main_vit_base", 7, s) for s in (32, 64, 224)]  # base once per size: it is the slow one on a CPU


@pytest.mark.parametrize("arch,in_chans,img_size", FORWARD_CASES)
def test_forward_shapes(arch, in_chans, img_size):
    patch_size = 8 if img_size == 32 else 16  # 32 px / 16 = 4 patches: too few for mask ratio 0.8
    model = models_dama.build_model(arch, img_size=img_size, patch_size=patch_size, in_chans=in_chans)
    num_patches = (img_size // patch_size) ** 2
    with torch.no_grad():
        out = model(torch.rand(2, in_chans, img_size, img_size))
    assert out["pred1"].shape == out["pred2"].shape == (2, num_patches, patch_size * patch_size * in_chans)
    assert out["mask1"].shape == out["mask2"].shape == (2, num_patches)
    k = models_dama.num_visible_patches(num_patches, 0.8)
    assert ((out["mask1"] == 0).sum(1) == k).all() and ((out["mask2"] == 0).sum(1) == k).all()
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mask_ratio=0.2), "--mask_ratio"),
    (dict(mask_ratio=1.0), "--mask_ratio"),
    (dict(img_size=32, patch_size=16), "--mask_ratio 0.8 leaves no visible patch out of 4"),
    (dict(mask_overlap_ratio=1.5), "--mask_overlap_ratio"),
    (dict(last_k_blocks=13), "--last_k_blocks"),
    (dict(last_k_blocks=0), "--last_k_blocks"),
    (dict(img_size=36), "--img_size 36"),
    (dict(mask_sampling="hard"), "--mask_sampling"),
    (dict(info_pairing="pooled"), "--info_pairing"),
    (dict(loss_alpha=-0.5), "--loss_alpha must be >= 0, got -0.5"),
    (dict(loss_beta=-1.0), "--loss_beta must be >= 0, got -1.0"),
    (dict(mask_sampling="independent", info_pairing="aligned"), "--mask_sampling independent does not give"),
])
def test_invalid_settings_raise_clear_errors(kwargs, needle):
    config = dict(img_size=32, patch_size=8, in_chans=1) | kwargs
    with pytest.raises(ValueError, match=needle):
        models_dama.build_model("main_vit_tiny", **config)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown --arch 'vit_huge'"):
        models_dama.build_model("vit_huge")


def test_info_weight_zero_gives_the_reconstruction_losses_only():
    torch.manual_seed(0)
    model = models_dama.build_model("main_vit_tiny", img_size=32, patch_size=8, in_chans=1)
    out = model(torch.rand(2, 1, 32, 32), info_weight=0.0)
    assert out["loss"].item() == pytest.approx((out["loss_recon1"] + out["loss_recon2"]).item(), rel=1e-6)
    assert out["loss_info"].item() > 0


def test_reference_sampling_reproduces_the_batch_wide_overlap_defect():
    n, num_patches, overlap = 8, 64, 0.5
    mask1, loss1, k, gen = _masks(n, num_patches, 0.8)
    num_overlap = int(k * overlap)
    mask2, ids_shuffle2, ids_restore2 = adaptive_masking(mask1, loss1, overlap, sampling="reference", num_visible=k)
    # every row gets the union of all rows' overlap columns: the lowest raster indices of each row's visible set
    union = set()
    for row in range(n):
        union |= set(np.flatnonzero(mask1[row].numpy() == 0)[:num_overlap].tolist())
    for row in range(n):
        zeros = set(np.flatnonzero(mask2[row].numpy() == 0).tolist())
        assert union <= zeros and len(zeros) > k
        # the tokens student 2 encodes are its first K zeros in raster order
        assert ids_shuffle2[row, :k].tolist() == sorted(zeros)[:k]
        # the hardest H+O of student 1's hidden patches stay hidden unless the union reopened them
        hidden1 = np.flatnonzero(mask1[row].numpy() == 1)
        hardest = set(hidden1[np.argsort(loss1[row].numpy()[hidden1])][k - num_overlap:].tolist())
        assert all(mask2[row, p] == 1 for p in hardest - union)
    assert torch.equal(ids_shuffle2.gather(1, ids_restore2), torch.arange(num_patches).expand(n, -1))

    # One image per batch: the intended rule, with the overlap fixed to the lowest raster indices.
    mask2_one, _, _ = adaptive_masking(mask1[:1], loss1[:1], overlap, sampling="reference", num_visible=k)
    assert (mask2_one == 0).sum() == k and ((mask1[:1] == 0) & (mask2_one == 0)).sum() == num_overlap


def test_reference_sampling_trains_and_refuses_aligned_pairing():
    model = models_dama.build_model("main_vit_tiny", img_size=32, patch_size=8, in_chans=1, mask_sampling="reference")
    out = model(torch.rand(4, 1, 32, 32))
    assert torch.isfinite(out["loss"]) and ((out["mask2"] == 0).sum(1) >= model.num_visible).all()
    with pytest.raises(ValueError, match="--info_pairing aligned"):
        models_dama.build_model("main_vit_tiny", img_size=32, patch_size=8, in_chans=1, mask_sampling="reference",
                                  info_pairing="aligned")


def _numpy_mae_sincos(embed_dim, grid_size, cls_token):
    """MAE's 2-D sin-cos table written independently in numpy: half the channels for the column (w)
    coordinate, half for the row (h), each [sin(p * w_k), cos(p * w_k)] with w_k = 1 / 10000^(2k / (D/2))."""
    def one_d(dim, positions):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size), np.arange(grid_size))  # 'xy': grid_w[i, j] = j
    table = np.concatenate([one_d(embed_dim // 2, grid_w), one_d(embed_dim // 2, grid_h)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table


def test_position_embeddings_are_maes_fixed_sincos_tables():
    model = models_dama.build_model("main_vit_tiny", img_size=64, patch_size=16, in_chans=7, decoder_embed_dim=64,
                                      decoder_depth=1, decoder_num_heads=2)
    for student in (model.student1, model.student2):
        np.testing.assert_allclose(student.pos_embed[0].numpy(), _numpy_mae_sincos(192, 4, True), atol=1e-6)
        np.testing.assert_allclose(student.decoder_pos_embed[0].numpy(), _numpy_mae_sincos(64, 4, True), atol=1e-6)
        assert student.pos_embed.dtype == torch.float32
    # row-major grid: patch 1 is one column to the right of patch 0, patch 4 one row down
    table = _numpy_mae_sincos(192, 4, False)
    assert np.allclose(table[1, 96:], table[0, 96:]) and not np.allclose(table[1, :96], table[0, :96])
    assert np.allclose(table[4, :96], table[0, :96]) and not np.allclose(table[4, 96:], table[0, 96:])


def test_students_use_maes_initialisation():
    """xavier-uniform Linear and patch-embed weights (viewed 2-D), zero Linear biases, LayerNorm 1/0, tokens
    N(0, 0.02); the patch-embed conv bias keeps PyTorch's default draw (as MAE and the reference DAMA)."""
    torch.manual_seed(0)
    first_conv = torch.nn.Conv2d(7, 192, 16, 16)  # the first module student 1 builds, from the same RNG state
    torch.manual_seed(0)
    model = models_dama.build_model("main_vit_tiny", img_size=64, patch_size=16, in_chans=7)
    assert torch.equal(model.student1.patch_embed.proj.bias, first_conv.bias)
    for student in (model.student1, model.student2):
        weights = [(name, module.weight) for name, module in student.named_modules()
                   if isinstance(module, torch.nn.Linear)]
        weights.append(("patch_embed.proj", student.patch_embed.proj.weight.flatten(1)))
        for name, weight in weights:
            fan_out, fan_in = weight.shape
            bound = (6.0 / (fan_in + fan_out)) ** 0.5
            assert weight.abs().max() <= bound + 1e-7, name
            # a uniform on [-a, a] has std a / sqrt(3); the smallest matrix here has over 10^4 entries
            assert abs(weight.std().item() / (bound / 3 ** 0.5) - 1) < 0.05, name
        biases = [module.bias for module in student.modules() if isinstance(module, torch.nn.Linear)]
        assert all(torch.count_nonzero(b) == 0 for b in biases)
        conv_bias = student.patch_embed.proj.bias  # PyTorch's default: uniform(+-1 / sqrt(fan_in))
        assert torch.count_nonzero(conv_bias) == 192 and conv_bias.abs().max() <= 1 / (7 * 16 * 16) ** 0.5
        norms = [m for m in student.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert len(norms) == 2 * 12 + 1 + 2 * 8 + 1  # two per block, final norms of encoder and decoder
        assert all(torch.all(m.weight == 1) and torch.count_nonzero(m.bias) == 0 and m.eps == 1e-6 for m in norms)
        for token in (student.cls_token, student.mask_token):
            assert 0.015 < token.std().item() < 0.025 and abs(token.mean().item()) < 0.01


def test_mask_configuration_error_states_the_condition_it_checks():
    # L = 16, r = 0.2: K = 12, O = 6, H = L - 2K = -8, so H+O = -2 <= 0
    with pytest.raises(ValueError, match=r"needs 0 < H\+O <= L-K, but H\+O = -2 and L-K = 4"):
        models_dama.build_model("main_vit_tiny", img_size=32, patch_size=8, in_chans=1, mask_ratio=0.2)
    # the condition, not a rule of thumb: r = 0.45 < 0.5 still gives 0 < H+O <= L-K at L = 64 (K = 35, O = 17,
    # H+O = 11), and the masks are then exact
    models_dama.check_mask_config(64, 0.45, 0.5)
    mask1, _, _ = models_dama.random_masking(8, 64, 35, generator=torch.Generator().manual_seed(0))
    mask2, ids_shuffle2, _ = models_dama.adaptive_masking(mask1, torch.rand(8, 64), 0.5, num_visible=35)
    assert ((mask2 == 0).sum(1) == 35).all() and (((mask1 == 0) & (mask2 == 0)).sum(1) == 17).all()
    # independent masks need only one visible patch
    models_dama.check_mask_config(16, 0.2, 0.5, "independent")


def test_independent_masks_share_k_squared_over_l_patches_on_average_and_random_exactly_o():
    num_patches, k, n = 64, 12, 4000
    gen = torch.Generator().manual_seed(0)
    mask1, _, _ = models_dama.random_masking(n, num_patches, k, generator=gen)
    loss1 = torch.rand(n, num_patches, generator=gen)
    shared = {}
    for sampling in ("independent", "random", "adaptive"):
        mask2, ids_shuffle2, ids_restore2 = models_dama.adaptive_masking(mask1, loss1, 0.5, sampling, gen, k)
        assert ((mask2 == 0).sum(1) == k).all()  # every row: exactly K visible
        assert torch.equal(mask2.gather(1, ids_shuffle2[:, :k]), torch.zeros(n, k))  # the encoder gets its zeros
        assert torch.equal(ids_shuffle2.gather(1, ids_restore2), torch.arange(num_patches).expand(n, -1))
        shared[sampling] = ((mask1 == 0) & (mask2 == 0)).sum(1).float()
    assert (shared["random"] == 6).all() and (shared["adaptive"] == 6).all()  # O = int(K * 0.5)
    # independent: hypergeometric, mean K*K/L = 2.25, variance 1.51 (standard error of the mean 0.02)
    assert abs(shared["independent"].mean().item() - k * k / num_patches) < 0.1
    assert abs(shared["independent"].var().item() - 1.51) < 0.15
    # and it does not follow student 1's loss: the hardest patch is as likely visible to student 2 as any other
    hardest = torch.where(mask1 > 0, loss1, torch.full_like(loss1, -1.0)).argmax(dim=1, keepdim=True)
    mask2, _, _ = models_dama.adaptive_masking(mask1, loss1, 0.5, "independent", gen, k)
    assert abs((mask2.gather(1, hardest) == 0).float().mean().item() - k / num_patches) < 0.03


def test_dama_with_independent_masks_trains():
    torch.manual_seed(0)
    model = models_dama.build_model("main_vit_tiny", img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1,
                                    decoder_num_heads=2, mask_sampling="independent")
    out = model(torch.rand(3, 7, 32, 32))
    assert torch.isfinite(out["loss"]) and ((out["mask2"] == 0).sum(1) == 3).all()
    assert model.mask_summary() == "3 of 16 patches visible per student, about 0.6 shared on average (independent masks)"
    out["loss"].backward()
    assert model.student2.blocks[0].attn.qkv.weight.grad is not None
