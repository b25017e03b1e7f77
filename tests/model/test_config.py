import pytest

from megafold.errors import ConfigError
from megafold.model import PRESETS, preset


def test_presets():
    assert set(PRESETS) == {"tiny", "small", "paper"}
    paper = preset("paper")
    assert (paper.c_s, paper.c_z, paper.c_m, paper.c_atom, paper.c_atompair, paper.c_token) == (384, 128, 64, 128, 16, 768)
    assert (paper.pairformer_blocks, paper.msa_blocks, paper.template_blocks, paper.confidence_blocks) == (48, 4, 2, 4)
    assert (paper.diffusion_blocks, paper.diffusion_heads, paper.atom_encoder_blocks, paper.atom_decoder_blocks) == (24, 16, 3, 3)
    assert (paper.atom_queries, paper.atom_keys, paper.tri_attn_heads, paper.tri_attn_head_dim) == (32, 128, 4, 32)
    assert paper.c_s // paper.single_heads == 24 and paper.c_s_inputs == 449
    assert (paper.diffusion_samples, paper.sampler_steps, paper.sigma_data, paper.recycles) == (48, 200, 16.0, 4)
    assert (paper.diffusion_loss_weight, paper.distogram_loss_weight, paper.confidence_loss_weight) == (4.0, 0.03, 1e-4)
    assert paper.checkpoint and paper.bf16 and paper.pair_bf16_checkpoint and paper.diffusion_chunk > 0
    tiny = preset("tiny", c_z=24, kernels="torch")
    assert tiny.c_z == 24 and tiny.kernels == "torch" and tiny.sampler_steps == 4
    assert tiny.replace(c_s=64).c_s == 64 and tiny.c_s == 32


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: preset("huge"), "huge"),
        (lambda: preset("tiny", c_q=3), "c_q"),
        (lambda: preset("tiny", kernels="cuda"), "kernels"),
        (lambda: preset("tiny", c_z=0), "c_z"),
        (lambda: preset("tiny", c_z=16.0), "c_z"),
        (lambda: preset("tiny", checkpoint=1), "checkpoint"),
        (lambda: preset("tiny", single_heads=3), "single_heads"),
        (lambda: preset("tiny", pair_dropout=1.5), "pair_dropout"),
        (lambda: preset("tiny", atom_keys=33), "atom_keys"),
        (lambda: preset("tiny").replace(msa_blocks=-1), "msa_blocks"),
    ],
)
def test_bad_config_names_the_problem(call, message):
    with pytest.raises(ConfigError, match=message):
        call()
