"""DAMA: Dual-Loss Adaptive Masked Autoencoder (Ly et al., arXiv 2205.05194).

Two MAE "students" train together. Student 1 sees a random subset of patches; student 2 is masked
*adaptively* from student 1's per-patch reconstruction error: it must reconstruct the patches student 1
reconstructed worst, sees the ones student 1 reconstructed best, and shares a random subset of student 1's
visible patches. A feature-level regression ("info") loss ties student 1's projected latent to a target
built from student 2's last blocks.

Shapes: N batch, C channels, L = (img_size / p)^2 patches, K visible patches per student, D encoder width.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from util.pos_embed import get_2d_sincos_pos_embed
from util.errors import ConfigError, DataError

# How student 2's mask is drawn (adaptive_masking): 'adaptive' is DAMA; 'random' the paper's DAMA-rand (the same
# structure, exactly O patches shared, the rest at random); 'independent' a uniform mask of its own, independent of
# student 1's; 'reference' the reference code's batch-wide overlap defect, for comparison runs only.
MASK_SAMPLINGS = ("adaptive", "random", "independent", "reference")
INFO_PAIRINGS = ("positional", "aligned")
INFO_REDUCTIONS = ("sum", "mean")

# Encoder sizes (width, depth, heads); the --arch registry at the end of this file names them for both models.
ENCODER_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


# --------------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------------
def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - r)), computed in floating point as the reference does (r=0.8, L=196 -> 39)."""
    return int(num_patches * (1 - mask_ratio))


def check_mask_config(num_patches: int, mask_ratio: float, mask_overlap_ratio: float,
                      sampling: str = "adaptive") -> None:
    """Reject settings for which `adaptive_masking` cannot build student 2's mask.

    With K = int(L (1 - r)) visible patches per student, O = int(K o) shared and H = L - 2K, student 2 sees the
    K - O easiest of student 1's L - K hidden patches and hides the other H + O of them: that needs
    0 < H + O <= L - K. (H + O <= L - K holds whenever O <= K; H + O > 0 means K - O < L - K.) 'independent'
    masking needs only K >= 1.
    """
    if not 0.0 <= mask_overlap_ratio <= 1.0:
        raise ConfigError(f"--mask_overlap_ratio must be in [0, 1], got {mask_overlap_ratio}")
    k = num_visible_patches(num_patches, mask_ratio)
    if k < 1:
        raise ConfigError(f"--mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    if sampling == "independent":
        return
    num_hard = num_patches - 2 * k
    num_overlap = int(k * mask_overlap_ratio)
    if not 0 < num_hard + num_overlap <= num_patches - k:
        raise ConfigError(
            f"--mask_ratio {mask_ratio} with --mask_overlap_ratio {mask_overlap_ratio} is invalid for L = "
            f"{num_patches} patches: K = {k} visible per student, O = {num_overlap} shared, H = L-2K = {num_hard}; "
            f"student 2's mask needs 0 < H+O <= L-K, but H+O = {num_hard + num_overlap} and L-K = {num_patches - k} "
            f"(raise --mask_ratio or --mask_overlap_ratio)")


def mask_from_visible(ids_visible: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[N, K] visible patch indices -> [N, L] float mask, 1 = hidden, 0 = visible."""
    mask = torch.ones(ids_visible.shape[0], num_patches, device=ids_visible.device)
    return mask.scatter_(1, ids_visible, 0.0)


def random_masking(batch_size: int, num_patches: int, num_visible: int, device=None, generator=None):
    """MAE random masking: returns (mask [N, L], ids_shuffle [N, L], ids_restore [N, L]).

    ids_shuffle[:, :K] are the visible patches, in random order.
    """
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = mask_from_visible(ids_shuffle[:, :num_visible], num_patches)
    return mask, ids_shuffle, ids_restore


def adaptive_masking(mask1, loss1, mask_overlap_ratio, sampling="adaptive", generator=None, num_visible=None):
    """Student 2's mask from student 1's mask and per-patch loss, batched and exact.

    mask1: [N, L], 1 = hidden from student 1, with K zeros per row. loss1: [N, L] per-patch loss of student 1.
    With H = L - 2K and O = int(K * mask_overlap_ratio), student 2, per sample:
      - hides the H+O hidden-from-1 patches with the highest loss (student 1's hardest),
      - sees the other K-O hidden-from-1 patches (student 1's lowest-loss ones),
      - sees O of student 1's visible patches chosen uniformly at random (the overlap),
      - hides the remaining K-O of student 1's visible patches.
    sampling='random' ("DAMA-rand") draws the K-O patches at random from student 1's hidden set instead.
    sampling='independent' ignores all of that: student 2 gets K visible patches from its own uniform noise,
    independent of student 1's mask (so K*K/L of them are shared on average, not exactly O).
    num_visible: K, when the caller knows it (avoids reading mask1 back to the host).

    Returns (mask2 [N, L], ids_shuffle2 [N, L], ids_restore2 [N, L]); ids_shuffle2[:, :K] are student 2's
    visible patches in raster order.
    """
    if sampling not in MASK_SAMPLINGS:
        raise ConfigError(f"--mask_sampling must be one of {MASK_SAMPLINGS}, got {sampling!r}")
    n, num_patches = mask1.shape
    k = int((mask1[0] == 0).sum()) if num_visible is None else num_visible
    if sampling == "reference":
        return reference_adaptive_masking(mask1, loss1, mask_overlap_ratio, k)
    if sampling == "independent":
        return independent_masking(n, num_patches, k, mask1.device, generator)
    num_overlap = int(k * mask_overlap_ratio)
    mask1 = mask1.detach()
    hidden1 = mask1 > 0.5

    # Rank student 1's hidden patches by loss (or by noise for DAMA-rand); its visible ones sort first
    # (-inf), so positions K.. hold the hidden patches in ascending order of difficulty.
    if sampling == "adaptive":
        score = loss1.detach().float()
    else:
        score = torch.rand(n, num_patches, device=mask1.device, generator=generator)
    score = torch.where(hidden1, score, torch.full_like(score, float("-inf")))
    ids_by_score = torch.argsort(score, dim=1)  # [N, L]
    ids_easy = ids_by_score[:, k:2 * k - num_overlap]  # [N, K-O] lowest-loss hidden-from-1
    ids_hard = ids_by_score[:, 2 * k - num_overlap:]  # [N, H+O] highest-loss hidden-from-1

    # A uniformly random order of student 1's visible patches (hidden ones pushed to the end): the first O
    # are shared with student 2, independently per sample.
    noise = torch.rand(n, num_patches, device=mask1.device, generator=generator)
    noise = torch.where(hidden1, torch.full_like(noise, 2.0), noise)
    ids_visible1 = torch.argsort(noise, dim=1)[:, :k]  # [N, K]
    ids_overlap, ids_not_shared = ids_visible1[:, :num_overlap], ids_visible1[:, num_overlap:]

    # Raster order for the visible tokens, as the reference feeds student 2 (argsort of its mask).
    ids_keep2 = torch.sort(torch.cat([ids_overlap, ids_easy], dim=1), dim=1).values  # [N, K]
    ids_shuffle2 = torch.cat([ids_keep2, ids_not_shared, ids_hard], dim=1)  # [N, L]
    ids_restore2 = torch.argsort(ids_shuffle2, dim=1)
    mask2 = mask_from_visible(ids_keep2, num_patches)
    return mask2, ids_shuffle2, ids_restore2


def independent_masking(batch_size: int, num_patches: int, num_visible: int, device=None, generator=None):
    """Student 2's mask from its own uniform noise (`random_masking`), its visible patches put in raster order as
    adaptive_masking gives them: (mask2 [N, L], ids_shuffle2 [N, L], ids_restore2 [N, L])."""
    mask, ids_shuffle, _ = random_masking(batch_size, num_patches, num_visible, device, generator)
    ids_keep = torch.sort(ids_shuffle[:, :num_visible], dim=1).values  # [N, K]
    ids_shuffle = torch.cat([ids_keep, ids_shuffle[:, num_visible:]], dim=1)
    return mask, ids_shuffle, torch.argsort(ids_shuffle, dim=1)


def reference_adaptive_masking(mask1, loss1, mask_overlap_ratio, num_visible):
    """The reference code's adaptive masking, defects included, for comparison runs (--mask_sampling reference).

    The overlap patches are the first O zeros of a stable argsort of mask1 (the lowest raster indices of
    student 1's visible patches) and they are written into *every* row: each sample gets the union of the
    whole batch's overlap positions. mask2 then has more than K zeros whenever the batch holds more than one
    image; the K tokens student 2 encodes are its first K zeros in raster order, and its loss is taken over
    mask2's ones only. With one image per batch this equals the intended rule with a fixed overlap choice.
    """
    n, num_patches = mask1.shape
    k, num_overlap = num_visible, int(num_visible * mask_overlap_ratio)
    mask1 = mask1.detach()
    ids_hard = torch.argsort(loss1.detach().float() * mask1, dim=1)[:, 2 * k - num_overlap:]  # [N, H+O]
    mask2 = (1.0 - mask1).scatter(1, ids_hard, 1.0)
    ids_overlap = torch.argsort(mask1, dim=1, stable=True)[:, :num_overlap]  # [N, O]
    mask2[:, ids_overlap.flatten()] = 0.0  # the defect: one batch-wide set of columns
    ids_shuffle2 = torch.argsort(mask2, dim=1, stable=True)
    return mask2, ids_shuffle2, torch.argsort(ids_shuffle2, dim=1)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C], pixels ordered (row, col, channel) inside a patch, channel fastest."""
    n, c, h, w = imgs.shape
    gh, gw = h // patch_size, w // patch_size
    x = imgs.reshape(n, c, gh, patch_size, gw, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, in_chans: int) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W]; the inverse of `patchify` for a square grid."""
    n, num_patches, _ = patches.shape
    g = int(round(num_patches ** 0.5))
    x = patches.reshape(n, g, g, patch_size, patch_size, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, g * patch_size, g * patch_size)


def recon_target(imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool = True) -> torch.Tensor:
    """MAE's reconstruction target [N, L, p*p*C]: each patch standardised by its own mean and unbiased
    variance when `norm_pix_loss`."""
    target = patchify(imgs.float(), patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as torch's default and the reference
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def recon_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    """Per-patch MSE [N, L] and its mean over the hidden patches of the batch (scalar)."""
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [N, L]
    return (per_patch * mask).sum() / mask.sum(), per_patch


def regression_target(feats) -> torch.Tensor:
    """Softmax over D of the mean of the given blocks' MLP-branch outputs, each layer-normed without
    affine in float32: [N, T, D]. Not detached: the reference trains student 2 through it."""
    normed = [F.layer_norm(f.float(), f.shape[-1:]) for f in feats]
    return torch.stack(normed).mean(dim=0).softmax(dim=-1)


def info_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0, alpha: float = 1.0,
              reduction: str = "sum") -> torch.Tensor:
    """Elementwise smooth-L1 (beta; 0 = squared error) summed over D, then summed ('sum', the reference)
    or averaged ('mean') over tokens and batch, times alpha. pred, target: [N, T, D]."""
    pred = pred.float()
    if beta == 0:
        elementwise = (pred - target).pow(2)
    else:
        elementwise = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    per_token = elementwise.sum(dim=-1)  # [N, T]
    total = per_token.sum() if reduction == "sum" else per_token.mean()
    return alpha * total


def shared_token_pairs(ids_restore1, ids_shuffle2, mask1, num_visible, num_overlap):
    """Token indices [N, 1+O] into student 1's and student 2's encoder sequences that pair cls with cls
    and each patch both students saw with itself (the `aligned` info pairing)."""
    ids_keep2 = ids_shuffle2[:, :num_visible]  # [N, K]
    # Student 2's visible patches that student 1 also saw come first under a stable sort on mask1.
    order = torch.argsort(mask1.gather(1, ids_keep2), dim=1, stable=True)[:, :num_overlap]
    ids_shared = ids_keep2.gather(1, order)  # [N, O] patch indices
    pos1 = ids_restore1.gather(1, ids_shared) + 1  # +1: cls sits at position 0
    pos2 = order + 1  # position in student 2's sequence is the index into ids_keep2
    cls = torch.zeros_like(pos1[:, :1])
    return torch.cat([cls, pos1], dim=1), torch.cat([cls, pos2], dim=1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[N, T, D] gathered at [N, T'] -> [N, T', D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
def block_with_mlp_output(block: Block, x: torch.Tensor):
    """Run a timm Block and also return its MLP branch mlp(norm2(h)) before the residual add."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    mlp_out = block.mlp(block.norm2(x))
    x = x + block.drop_path2(block.ls2(mlp_out))
    return x, mlp_out


class MAEStudent(nn.Module):
    """One student: an MAE with a ViT encoder over the visible patches and a lightweight decoder.

    Encoder parameter names are timm VisionTransformer's, so the encoder exports to timm unchanged.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=7, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"--img_size {img_size} is not divisible by --patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans, self.depth = img_size, patch_size, in_chans, depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        grid = img_size // patch_size

        # Encoder
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(  # fixed sin-cos, kept in the state dict for export
            get_2d_sincos_pos_embed(embed_dim, grid, cls_token=True).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # Decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            get_2d_sincos_pos_embed(decoder_embed_dim, grid, cls_token=True).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        """MAE init: xavier-uniform Linear and patch-embed weights, zero Linear biases, LayerNorm 1/0, tokens
        N(0, .02). The patch-embed conv bias keeps PyTorch's default init, as in the official MAE and the reference
        DAMA (their init touches only Linear and LayerNorm modules)."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def embed_visible_patches(self, imgs, ids_visible):
        """patch_embed(imgs) + pos_embed at the visible patches only: [N, K, D].

        Equal to timm's PatchEmbed conv followed by a gather, but computed as one GEMM over the K visible
        patches: 1/(1 - mask_ratio) times fewer FLOPs, and a reduction over C*p*p (1792 for 7 channels)
        that suits tensor cores, where a cuDNN conv over 7 input channels may not.
        """
        n, c, h, w = imgs.shape
        if (c, h, w) != (self.in_chans, self.img_size, self.img_size):
            raise DataError(f"input images are {c}x{h}x{w}; the model expects --in_chans {self.in_chans} "
                             f"and --img_size {self.img_size} ({self.in_chans}x{self.img_size}x{self.img_size})")
        p = self.patch_size
        patches = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # [N, gh, gw, C, p, p]
        patches = gather_tokens(patches.reshape(n, -1, c * p * p), ids_visible)  # [N, K, C*p*p], conv order
        proj = self.patch_embed.proj
        x = F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)
        return x + gather_tokens(self.pos_embed[:, 1:].expand(n, -1, -1), ids_visible)

    def forward_encoder(self, imgs, ids_visible, num_feature_blocks=0):
        """Encode the visible patches.

        imgs [N, C, H, W]; ids_visible [N, K]. Returns the normed latent [N, 1+K, D] (cls first) and the
        MLP-branch outputs [N, 1+K, D] of the last `num_feature_blocks` blocks.
        """
        x = self.embed_visible_patches(imgs, ids_visible)  # [N, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # [N, 1+K, D]
        feats = []
        first_feature_block = self.depth - num_feature_blocks
        for i, block in enumerate(self.blocks):
            if i >= first_feature_block:
                x, mlp_out = block_with_mlp_output(block, x)
                feats.append(mlp_out)
            else:
                x = block(x)
        return self.norm(x), feats

    def forward_decoder(self, latent, ids_restore):
        """latent [N, 1+K, D], ids_restore [N, L] -> predicted patches [N, L, p*p*C]."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        n, num_tokens, width = x.shape
        mask_tokens = self.mask_token.expand(n, self.num_patches + 1 - num_tokens, -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
        patches = gather_tokens(patches, ids_restore)  # back to raster order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop cls

    def forward(self, imgs, ids_shuffle, ids_restore, num_visible, num_feature_blocks=0):
        """Encode the first `num_visible` patches of ids_shuffle and decode all: (pred, latent, feats)."""
        latent, feats = self.forward_encoder(imgs, ids_shuffle[:, :num_visible], num_feature_blocks)
        return self.forward_decoder(latent, ids_restore), latent, feats


def _init_linear_and_norm(m):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def projection_head(dim: int) -> nn.Sequential:
    """Student 1's latent -> a distribution over D: Linear-LN-ReLU-Linear-LN-ReLU-Softmax (the reference's,
    with PyTorch's default init)."""
    return nn.Sequential(
        nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.ReLU(inplace=True),
        nn.Linear(2 * dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Softmax(dim=-1))


class DAMA(nn.Module):
    """Two independent students trained jointly, student 2 masked adaptively from student 1's loss."""

    num_students = 2
    loss_terms = ("loss", "loss_recon1", "loss_recon2", "loss_info")  # the scalar losses forward returns

    def __init__(self, img_size=224, patch_size=16, in_chans=7, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 mask_ratio=0.8, mask_overlap_ratio=0.5, last_k_blocks=6, loss_beta=2.0, loss_alpha=1.0,
                 norm_pix_loss=True, mask_sampling="adaptive", info_pairing="positional", info_reduction="sum"):
        super().__init__()
        if not 1 <= last_k_blocks <= depth:
            raise ConfigError(f"--last_k_blocks must be between 1 and the encoder depth {depth}, got {last_k_blocks}")
        for flag, value, choices in (("--mask_sampling", mask_sampling, MASK_SAMPLINGS),
                                     ("--info_pairing", info_pairing, INFO_PAIRINGS),
                                     ("--info_reduction", info_reduction, INFO_REDUCTIONS)):
            if value not in choices:
                raise ConfigError(f"{flag} must be one of {choices}, got {value!r}")
        if mask_sampling in ("reference", "independent") and info_pairing == "aligned":
            raise ConfigError(f"--info_pairing aligned needs exact masks; --mask_sampling {mask_sampling} does not give "
                              "student 2 exactly O of student 1's patches (use adaptive or random)")
        for flag, value in (("--loss_alpha", loss_alpha), ("--loss_beta", loss_beta)):
            if value < 0:  # (NaN passes: tests/test_pretrain.py provokes a non-finite loss with it)
                raise ConfigError(f"{flag} must be >= 0, got {value}")
        student = partial(MAEStudent, img_size, patch_size, in_chans, embed_dim, depth, num_heads,
                          decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        self.student1 = student()
        self.student2 = student()  # separate draw from the RNG: an independent init
        self.head = projection_head(embed_dim)

        self.patch_size, self.in_chans = patch_size, in_chans
        self.num_patches = self.student1.num_patches
        check_mask_config(self.num_patches, mask_ratio, mask_overlap_ratio, mask_sampling)
        self.mask_ratio, self.mask_overlap_ratio = mask_ratio, mask_overlap_ratio
        self.num_visible = num_visible_patches(self.num_patches, mask_ratio)
        self.num_overlap = int(self.num_visible * mask_overlap_ratio)
        self.last_k_blocks, self.loss_beta, self.loss_alpha = last_k_blocks, loss_beta, loss_alpha
        self.norm_pix_loss, self.mask_sampling = norm_pix_loss, mask_sampling
        self.info_pairing, self.info_reduction = info_pairing, info_reduction

    def mask_summary(self) -> str:
        """How many patches each student sees and shares, for the run's log."""
        shared = (f"about {self.num_visible ** 2 / self.num_patches:.1f} shared on average (independent masks)"
                  if self.mask_sampling == "independent" else f"{self.num_overlap} shared")
        return f"{self.num_visible} of {self.num_patches} patches visible per student, {shared}"

    def forward(self, imgs, info_weight=1.0, generator=None):
        """imgs [N, C, H, W] -> dict of losses, masks ([N, L], 1 = hidden) and predictions [N, L, p*p*C].

        info_weight scales the regression term in the total (0 during --stable_epoch); the term is still
        computed so that every parameter takes part in the graph (DDP without unused-parameter search).
        """
        n, k = imgs.shape[0], self.num_visible
        target = recon_target(imgs, self.patch_size, self.norm_pix_loss)  # [N, L, p*p*C], shared by both

        mask1, ids_shuffle1, ids_restore1 = random_masking(n, self.num_patches, k, imgs.device, generator)
        pred1, latent1, _ = self.student1(imgs, ids_shuffle1, ids_restore1, k)
        loss_recon1, loss1_per_patch = recon_loss(pred1, target, mask1)

        mask2, ids_shuffle2, ids_restore2 = adaptive_masking(
            mask1, loss1_per_patch.detach(), self.mask_overlap_ratio, self.mask_sampling, generator, k)
        pred2, _, feats2 = self.student2(imgs, ids_shuffle2, ids_restore2, k, self.last_k_blocks)
        loss_recon2, _ = recon_loss(pred2, target, mask2)

        info_pred = self.head(latent1)  # [N, 1+K, D]
        info_target = regression_target(feats2)  # [N, 1+K, D]
        if self.info_pairing == "aligned":
            pos1, pos2 = shared_token_pairs(ids_restore1, ids_shuffle2, mask1, k, self.num_overlap)
            info_pred, info_target = gather_tokens(info_pred, pos1), gather_tokens(info_target, pos2)
        loss_info = info_loss(info_pred, info_target, self.loss_beta, self.loss_alpha, self.info_reduction)

        loss = info_weight * loss_info + loss_recon1 + loss_recon2
        return dict(loss=loss, loss_recon1=loss_recon1, loss_recon2=loss_recon2, loss_info=loss_info,
                    mask1=mask1, mask2=mask2, pred1=pred1, pred2=pred2, loss1_per_patch=loss1_per_patch.detach(),
                    ids_shuffle1=ids_shuffle1, ids_shuffle2=ids_shuffle2)


# --------------------------------------------------------------------------------------------------
# MAE baseline (the paper's "MAE" row): one student, random masking, reconstruction loss only
# --------------------------------------------------------------------------------------------------
# Options of main_pretrain.py that only DAMA uses; MAE accepts and ignores them so the script runs unchanged.
DAMA_ONLY_OPTIONS = ("mask_overlap_ratio", "last_k_blocks", "loss_beta", "loss_alpha", "mask_sampling",
                     "info_pairing", "info_reduction")


class MAE(nn.Module):
    """He et al.'s MAE as a single `MAEStudent` named `student1`, so that its checkpoints load for fine-tuning
    (--student 1) and export exactly like DAMA's.

    forward returns what it computes: the reconstruction loss and student 1's mask, prediction and per-patch loss
    (DAMA's keys for student 1, so the engine and the figures treat both models alike; `loss_terms` and
    `num_students` say what there is).
    """

    num_students = 1
    loss_terms = ("loss",)  # the reconstruction loss is the whole loss

    def __init__(self, img_size=224, patch_size=16, in_chans=7, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 mask_ratio=0.75, norm_pix_loss=True, **dama_options):
        super().__init__()
        unknown = sorted(set(dama_options) - set(DAMA_ONLY_OPTIONS))
        if unknown:
            raise TypeError(f"MAE got unexpected keyword arguments {unknown}")
        if not 0.0 < mask_ratio < 1.0:  # checked before the (costly) student is built
            raise ConfigError(f"--mask_ratio must be strictly between 0 and 1 for MAE, got {mask_ratio}")
        self.student1 = MAEStudent(img_size, patch_size, in_chans, embed_dim, depth, num_heads,
                                   decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        self.patch_size, self.in_chans = patch_size, in_chans
        self.num_patches = self.student1.num_patches
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.num_visible = num_visible_patches(self.num_patches, mask_ratio)
        if self.num_visible < 1:
            raise ConfigError(f"--mask_ratio {mask_ratio} leaves no visible patch out of {self.num_patches}")

    def mask_summary(self) -> str:
        return f"{self.num_visible} of {self.num_patches} patches visible (one student)"

    def forward(self, imgs, info_weight=1.0, generator=None):
        """imgs [N, C, H, W] -> dict of the loss and student 1's mask [N, L], prediction [N, L, p*p*C], per-patch
        loss [N, L] and ids_shuffle1; info_weight is accepted for the engine and unused."""
        n, k = imgs.shape[0], self.num_visible
        target = recon_target(imgs, self.patch_size, self.norm_pix_loss)  # [N, L, p*p*C]
        mask, ids_shuffle, ids_restore = random_masking(n, self.num_patches, k, imgs.device, generator)
        pred, _, _ = self.student1(imgs, ids_shuffle, ids_restore, k)
        loss, per_patch = recon_loss(pred, target, mask)
        return dict(loss=loss, mask1=mask, pred1=pred, loss1_per_patch=per_patch.detach(), ids_shuffle1=ids_shuffle)


# --------------------------------------------------------------------------------------------------
# The --arch registry: DAMA (main_vit_*) and the MAE baseline (mae_vit_*), at the same encoder/decoder sizes
# --------------------------------------------------------------------------------------------------
ARCHS = {**{f"main_vit_{size}": (DAMA, encoder) for size, encoder in ENCODER_SIZES.items()},
         **{f"mae_vit_{size}": (MAE, encoder) for size, encoder in ENCODER_SIZES.items()}}
ARCH_CONFIGS = {name: encoder for name, (_, encoder) in ARCHS.items()}  # encoder size by --arch (models_vit too)


def build_model(arch: str, **kwargs) -> nn.Module:
    """The pretraining model for --arch (DAMA or the MAE baseline), with a clear error for an unknown name."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; expected one of {sorted(ARCHS)}")
    model_class, encoder = ARCHS[arch]
    return model_class(**encoder, **kwargs)
