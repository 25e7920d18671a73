"""Fixed 2-D sin-cos position embeddings (MAE's recipe) and their resampling to a new grid."""
import torch
from timm.layers import resample_abs_pos_embed


def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim]: sin(p * w_k) for all k, then cos(p * w_k), w_k = 1 / 10000^(k / (D/2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even width, got {embed_dim}")
    # float64 so that large grids do not lose precision before the final cast
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # [D/2]
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # [M, D/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # [M, D]


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """[g*g (+1), embed_dim] float32 table for a g x g patch grid in raster order.

    The first half of the channels encodes the column index, the second half the row index; with
    `cls_token` a leading all-zero row is added for the cls token.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb_cols = get_1d_sincos_pos_embed(embed_dim // 2, cols.flatten())
    emb_rows = get_1d_sincos_pos_embed(embed_dim // 2, rows.flatten())
    table = torch.cat([emb_cols, emb_rows], dim=1)  # [g*g, D]
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=table.dtype), table], dim=0)
    return table.float()


def resample_pos_embed(pos_embed: torch.Tensor, new_grid_size: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[1, P + g*g, D] -> [1, P + G*G, D]: bicubic resample of the patch rows, prefix (cls) rows kept."""
    old_grid = int(round((pos_embed.shape[1] - num_prefix_tokens) ** 0.5))
    if old_grid == new_grid_size:
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed, new_size=(new_grid_size, new_grid_size), old_size=(old_grid, old_grid),
        num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=False, verbose=False)
