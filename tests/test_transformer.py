"""The over-parameterised transformer student (simstudy.models.networks, DESIGN §2, §6 check 6)."""
import math

import numpy as np
import pytest
import torch

from simstudy.models import LinearPerturbation, PerturbedLM, TransformerConfig, TransformerNetwork, make_network
from simstudy.models.networks import Block

V, L, D = 7, 2, 3


def tiny(prefix_len=L, seed=0, **config):
    """A small float64 student; ``config`` overrides TransformerConfig fields."""
    torch.manual_seed(seed)
    options = dict(n_layer=2, n_head=2, n_embd=16, max_len=8)
    options.update(config)
    return TransformerNetwork(vocab_size=V, prefix_len=prefix_len, embed_dim=D,
                              config=TransformerConfig(**options)).double()


def inputs(n=5, prefix_len=L, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(n, prefix_len, D, generator=g, dtype=torch.float64)  # (N, L, d)
    previous = torch.randn(n, c - 1, D, generator=g, dtype=torch.float64)  # (N, c-1, d)
    return prefix, previous


@pytest.fixture(params=[0, 100], ids=["sdpa", "loop"])
def attention_path(request, monkeypatch):
    """Run a test through each attention implementation (Block.loop_max_len decides which)."""
    monkeypatch.setattr(Block, "loop_max_len", request.param)
    return request.param


# ---- shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1, 3])
def test_iid_shapes_and_rows(c, attention_path):
    net = tiny()
    prefix, previous = inputs(c=c)
    logits = net(prefix, previous, "iid")
    assert logits.shape == (5, c, V)
    # iid: every observation is predicted from the prefix alone, so all rows agree
    # and equal the prediction without any continuation
    alone = net(prefix, None, "iid")
    assert alone.shape == (5, 1, V)
    torch.testing.assert_close(logits, alone.expand(5, c, V), rtol=0, atol=0)


@pytest.mark.parametrize("prefix_len,c", [(2, 2), (2, 4), (1, 3), (3, 5)])
def test_autoregressive_shapes(prefix_len, c, attention_path):
    net = tiny(prefix_len=prefix_len)
    prefix, previous = inputs(prefix_len=prefix_len, c=c)
    logits = net(prefix, previous, "autoregressive")
    assert logits.shape == (5, c, V)
    assert torch.isfinite(logits).all()
    # row 0 sees only the prefix: it is the iid prediction; later rows see earlier observations
    torch.testing.assert_close(logits[:, :1], net(prefix, None, "iid"), rtol=1e-12, atol=1e-12)
    assert (logits[:, 1] - logits[:, 0]).abs().max() > 1e-6


# ---- causality --------------------------------------------------------------------------------
@pytest.mark.parametrize("changed", [0, 1, 2])
def test_causality(changed, attention_path):
    """Changing observation y_j (continuation input j) leaves rows 0..j unchanged and moves rows j+1.."""
    net = tiny()
    prefix, previous = inputs(c=4)  # T = L + 3 = 5 tokens
    before = net(prefix, previous, "autoregressive")  # (N, 4, V)
    edited = previous.clone()
    edited[:, changed] += 1.0
    after = net(prefix, edited, "autoregressive")
    torch.testing.assert_close(after[:, :changed + 1], before[:, :changed + 1], rtol=0, atol=1e-13)
    assert ((after[:, changed + 1:] - before[:, changed + 1:]).abs().amax(dim=(0, 2)) > 1e-6).all()


def test_prefix_changes_every_row(attention_path):
    net = tiny()
    prefix, previous = inputs(c=3)
    before = net(prefix, previous, "autoregressive")
    edited = prefix.clone()
    edited[:, 0] += 1.0  # the first prefix token is seen by every prediction
    after = net(edited, previous, "autoregressive")
    assert ((after - before).abs().amax(dim=(0, 2)) > 1e-6).all()


# ---- the two attention implementations agree ---------------------------------------------------
@pytest.mark.parametrize("prefix_len,c,continuation", [(2, 1, "iid"), (2, 2, "autoregressive"),
                                                       (1, 3, "autoregressive"), (3, 6, "autoregressive")])
def test_loop_and_sdpa_attention_agree(prefix_len, c, continuation, monkeypatch):
    net = tiny(prefix_len=prefix_len)
    prefix, previous = inputs(prefix_len=prefix_len, c=c)
    monkeypatch.setattr(Block, "loop_max_len", 100)
    loop = net(prefix, previous, continuation)
    monkeypatch.setattr(Block, "loop_max_len", 0)
    sdpa = net(prefix, previous, continuation)
    torch.testing.assert_close(loop, sdpa, rtol=1e-12, atol=1e-12)


def test_attention_matches_explicit_reference():
    """One block's causal attention against a plain masked softmax written out here."""
    torch.manual_seed(3)
    block = Block(TransformerConfig(n_head=2, n_embd=8)).double()
    h = torch.randn(4, 3, 8, dtype=torch.float64)  # (N, T, C)
    q, k, v = block.qkv(block.ln_1(h)).split(8, dim=-1)
    q, k, v = (t.view(4, 3, 2, 4).transpose(1, 2) for t in (q, k, v))  # (N, nh, T, hs)
    scores = q @ k.transpose(-1, -2) / 2.0 + torch.full((3, 3), -math.inf).triu(1).double()  # (N, nh, T, T)
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(4, 3, 8)  # (N, T, C)
    h1 = h + block.proj(att)
    expected = h1 + block.fc_out(torch.nn.functional.gelu(block.fc(block.ln_2(h1))))
    for loop_max_len in (0, 100):
        block.loop_max_len = loop_max_len
        torch.testing.assert_close(block(h), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(block(h, start=2), expected[:, 2:], rtol=1e-12, atol=1e-12)


# ---- K draws in one pass equal a per-draw loop -------------------------------------------------
@pytest.mark.parametrize("continuation,c", [("iid", 2), ("autoregressive", 2), ("autoregressive", 3)])
def test_batched_draws_equal_per_draw_loop(continuation, c):
    torch.manual_seed(4)
    B, K = 6, 5
    embedding = torch.randn(V, D, dtype=torch.float64)
    net = make_network("transformer", vocab_size=V, prefix_len=L, embed_dim=D,
                       transformer=dict(n_layer=2, n_head=2, n_embd=16, max_len=8)).double()
    perturbation = LinearPerturbation(prefix_len=L, embed_dim=D, latent_dim=2, init_scale=0.5).double()
    lm = PerturbedLM(embedding=embedding, network=net, perturbation=perturbation, continuation=continuation)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(V, (B, L), generator=g)
    y = torch.randint(V, (B, c), generator=g)
    z = lm.sample_latent(x, K, g)  # (B, K, q)

    def surrogate(log_lik):  # (B, K): -mean_b logmeanexp_k log p(y | x, z_k), the is-K surrogate
        return -(torch.logsumexp(log_lik, dim=1) - math.log(K)).mean()

    batched = lm.log_lik(x, y, z)  # (B, K), one forward pass of B*K rows
    grads = torch.autograd.grad(surrogate(batched), list(lm.parameters()))
    looped = torch.cat([lm.log_lik(x, y, z[:, k:k + 1]) for k in range(K)], dim=1)  # (B, K), K passes
    loop_grads = torch.autograd.grad(surrogate(looped), list(lm.parameters()))
    assert batched.shape == (B, K)
    assert batched.std() > 1e-3  # the draws matter, so the comparison has power
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, loop_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- dropout ----------------------------------------------------------------------------------
def test_dropout_only_in_training():
    net = tiny(dropout=0.3)
    plain = tiny(dropout=0.0)
    plain.load_state_dict(net.state_dict())
    prefix, previous = inputs(c=4)  # T = 5: the sdpa path; T = 2 below: the loop path
    for args in [(prefix, previous, "autoregressive"), (prefix, None, "iid")]:
        net.eval()
        first, second = net(*args), net(*args)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(first, plain.eval()(*args), rtol=0, atol=0)  # eval ignores dropout
        net.train()
        torch.manual_seed(0)
        noisy = net(*args)
        assert (noisy - first).abs().max() > 1e-3  # dropout is active while training


# ---- parameter count --------------------------------------------------------------------------
def test_parameter_count_by_hand():
    # C = 8, one block, V = 5, d = 3, max_len = 4:
    # input (3 + 1) 8 + positions 4 * 8 + block 12 * 64 + 13 * 8 + ln_f 16 + head 9 * 5 = 997
    config = TransformerConfig(n_layer=1, n_head=2, n_embd=8, max_len=4)
    assert config.num_parameters(vocab_size=5, embed_dim=3) == 997
    net = TransformerNetwork(vocab_size=5, prefix_len=2, embed_dim=3, config=config)
    assert net.num_parameters() == 997 == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("n_layer,n_head,n_embd,max_len,vocab,embed_dim",
                         [(2, 4, 64, 16, 41, 3), (3, 2, 32, 8, 5, 4), (1, 8, 128, 4, 100, 16)])
def test_parameter_count_formula(n_layer, n_head, n_embd, max_len, vocab, embed_dim):
    config = TransformerConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, max_len=max_len)
    net = TransformerNetwork(vocab_size=vocab, prefix_len=2, embed_dim=embed_dim, config=config)
    assert net.num_parameters() == config.num_parameters(vocab_size=vocab, embed_dim=embed_dim)
    assert net.num_parameters() == sum(p.numel() for p in net.parameters())


def test_default_student_is_over_parameterised_for_the_reference_designs():
    # DESIGN §4: V = 41, d = 3; §6 check 6 needs parameters >> n for n up to about 32000
    width_128 = TransformerConfig(n_embd=128).num_parameters(vocab_size=41, embed_dim=3)
    assert width_128 > 10 * 32000


# ---- config -----------------------------------------------------------------------------------
def test_config_fields_have_help_and_accept_numpy_integers():
    for f in TransformerConfig.__dataclass_fields__.values():
        assert f.metadata.get("help"), f.name
    config = TransformerConfig(n_layer=np.int64(3), n_embd=np.int32(32), dropout=np.float32(0.25))
    assert (type(config.n_layer), type(config.n_embd), type(config.dropout)) == (int, int, float)
    assert config.head_size == 8
    net = make_network("transformer", vocab_size=V, prefix_len=L, embed_dim=D, transformer={"n_embd": 32})
    assert net.config.n_embd == 32


@pytest.mark.parametrize("bad,name", [
    (dict(n_layer=0), "n_layer"), (dict(n_head=0), "n_head"), (dict(n_embd=0), "n_embd"),
    (dict(max_len=0), "max_len"), (dict(n_layer=2.5), "n_layer"), (dict(n_head=True), "n_head"),
    (dict(n_embd=10, n_head=4), "n_embd"), (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(dropout=float("nan")), "dropout"), (dict(dropout="0.1"), "dropout"),
])
def test_invalid_config_raises(bad, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        TransformerConfig(**bad)


def test_invalid_network_arguments_raise():
    with pytest.raises(ValueError, match="prefix_len=9"):
        TransformerNetwork(vocab_size=V, prefix_len=9, embed_dim=D, config=TransformerConfig(max_len=8))
    with pytest.raises(ValueError, match="prefix_len=0"):
        TransformerNetwork(vocab_size=V, prefix_len=0, embed_dim=D)
    with pytest.raises(ValueError, match="embed_dim=0"):
        TransformerNetwork(vocab_size=V, prefix_len=L, embed_dim=0)
    with pytest.raises(ValueError, match="unknown"):
        TransformerNetwork(vocab_size=V, prefix_len=L, embed_dim=D, config={"width": 64})
    with pytest.raises(ValueError, match="config="):
        TransformerNetwork(vocab_size=V, prefix_len=L, embed_dim=D, config=64)
    with pytest.raises(ValueError, match="vocab_size=1"):
        TransformerConfig().num_parameters(vocab_size=1, embed_dim=D)
    net = tiny(max_len=4)
    prefix, previous = inputs(c=4)  # T = 5 > max_len = 4
    with pytest.raises(ValueError, match="max_len=4"):
        net(prefix, previous, "autoregressive")
    with pytest.raises(ValueError, match="continuation='markov'"):
        net(prefix, previous[:, :1], "markov")
