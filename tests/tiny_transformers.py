"""Tiny transformers built from configs (random init, no downloads) and, per family, the
torch-only ablation oracle: the dense model with given heads' output-projection columns
and given neurons' down-projection columns zeroed."""
import torch

transformers = __import__("pytest").importorskip("transformers")
T = transformers

H, NH, FF, L = 32, 4, 24, 2


def _cfg(family):
    if family == "bert":
        return T.BertConfig(vocab_size=60, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                            intermediate_size=FF, max_position_embeddings=64)
    if family == "roberta":
        return T.RobertaConfig(vocab_size=60, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                               intermediate_size=FF, max_position_embeddings=70, pad_token_id=1)
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=60, dim=H, n_layers=L, n_heads=NH, hidden_dim=FF,
                                  max_position_embeddings=64)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        return cls(vocab_size=60, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                   num_key_value_heads=2, intermediate_size=FF, max_position_embeddings=64,
                   pad_token_id=0)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=60, n_embd=H, n_layer=L, n_head=NH, n_inner=FF, n_positions=64,
                            pad_token_id=0)
    if family == "vit":
        return T.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=H,
                           num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF)
    raise KeyError(family)


FAMILIES = ("bert", "roberta", "distilbert", "llama", "mistral", "qwen2", "gpt2", "vit")


def build(family, seed=0, cls=None):
    torch.manual_seed(seed)
    cfg = _cfg(family)
    if family in ("llama", "mistral", "qwen2"):
        cfg.attention_bias = family == "qwen2"  # Qwen2 has Q/K/V biases anyway
    if cls is None:
        cls = (T.AutoModelForImageClassification if family == "vit"
               else T.AutoModelForSequenceClassification)
        cfg.num_labels = 3
    model = cls.from_config(cfg).eval()
    with torch.no_grad():  # larger weights and random biases, so every head's part shows
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
            elif p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def inputs(family, batch=2, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(2, 60, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _layers(model, family):
    base = getattr(model, model.base_model_prefix)
    if family in ("bert", "roberta"):
        return [(l.attention.output.dense, l.output.dense, 1) for l in base.encoder.layer]
    if family == "distilbert":
        return [(l.attention.out_lin, l.ffn.lin2, 1) for l in base.transformer.layer]
    if family in ("llama", "mistral", "qwen2"):
        return [(l.self_attn.o_proj, l.mlp.down_proj, 1) for l in base.layers]
    if family == "gpt2":
        return [(l.attn.c_proj, l.mlp.c_proj, 0) for l in base.h]
    if family == "vit":
        layers = base.encoder.layer if hasattr(base, "encoder") else base.layers
        return [(l.attention.o_proj, l.mlp.fc2, 1) for l in layers]
    raise KeyError(family)


@torch.no_grad()
def ablate(model, family, heads, neurons):
    """Zero output-projection columns of ``heads[layer]`` (query-head indices) and
    down-projection columns of ``neurons[layer]``, in place."""
    d = H // NH
    for i, (o, down, dim) in enumerate(_layers(model, family)):
        for h in heads.get(i, []):
            o.weight.narrow(dim, h * d, d).zero_()
        for n in neurons.get(i, []):
            down.weight.narrow(dim, n, 1).zero_()
    return model
