import pytest
import torch
import torch.nn.functional as F

import lora
from vqa import DeterministicVQA
from vqa.model import answer_loss, answer_loss_total


def tiny_model(**kwargs):
    args = dict(vision_model="vit_small_patch14_dinov2", img_size=28, vocab_size=30, num_answers=7, hidden_dim=16,
                num_heads=2, vision_lora_r=2, backbone_kwargs=dict(embed_dim=32, depth=2, num_heads=2, init_values=0.5))
    args.update(kwargs)
    return DeterministicVQA(**args)


def test_dinov2_base_snippet_counts_exactly_442368_lora_parameters():
    with torch.device("meta"):  # the real architecture, no memory: only counting
        model = DeterministicVQA(use_vision_lora=True, vision_lora_r=8)
    model.freeze_pretrained(unfreeze_encoder_layers=0, unfreeze_decoder=True)
    adapters = sum(p.numel() for _, layer in lora.lora_layers(model) for p in (layer.lora_A, layer.lora_B))
    decoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == 442_368
    assert trainable == adapters + decoder


def test_forward_shapes_and_trainable_selection():
    model = tiny_model()
    model.freeze_pretrained(unfreeze_encoder_layers=1, unfreeze_decoder=False)
    out = model(torch.randn(3, 3, 28, 28), torch.randint(1, 30, (3, 5)), torch.ones(3, 5))
    assert out.logits.shape == (3, 7) and out.type_logits.shape == (3, 6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("backbone.") for n in trainable)
    assert any(".lora_A" in n for n in trainable) and "backbone.blocks.1.mlp.fc1.weight" in trainable
    assert "backbone.blocks.0.mlp.fc1.weight" not in trainable


def test_questions_sharing_an_image_equal_one_image_per_question():
    model = tiny_model().eval()
    pixels = torch.randn(2, 3, 28, 28)
    ids = torch.randint(3, 30, (4, 6))
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    index = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        shared = model(pixels, ids, mask, image_index=index)
        repeated = model(pixels[index], ids, mask)
    torch.testing.assert_close(shared.logits, repeated.logits)


def test_padding_does_not_change_the_answer():
    model = tiny_model().eval()
    pixels, ids = torch.randn(1, 3, 28, 28), torch.randint(3, 30, (1, 4))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = model(pixels, ids, torch.ones(1, 4)).logits
        b = model(pixels, padded, (padded != 0).long()).logits
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("question_layers", [0, 1])
def test_trainable_state_dict_round_trips_into_a_fresh_model(question_layers):
    torch.manual_seed(0)
    source = tiny_model(question_layers=question_layers)
    source.freeze_pretrained()
    source.train()
    source(torch.randn(2, 3, 28, 28), torch.randint(3, 30, (2, 4)))  # moves BatchNorm running stats
    state = source.trainable_state_dict()
    assert "image_norm.running_mean" in state and not any(k.startswith("backbone.blocks.0.mlp") for k in state)
    torch.manual_seed(1)  # another draw: every decoder weight and adapter must come from the state dict
    target = tiny_model(question_layers=question_layers)
    target.backbone.load_state_dict(source.backbone.state_dict())  # the frozen base, which the run keeps apart
    for _, layer in lora.lora_layers(target):
        torch.nn.init.normal_(layer.lora_B)
    target.load_state_dict(state, strict=False)
    x, ids = torch.randn(2, 3, 28, 28), torch.randint(3, 30, (2, 4))
    source.eval(), target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(x, ids).logits, source(x, ids).logits)


def test_evaluate_restores_the_weights_and_keeps_no_merge_copy():
    from vqa.evaluate import evaluate

    model = tiny_model().train()
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    weights = {n: l.weight.detach().clone() for n, l in lora.lora_layers(model)}
    batch = {"pixel_values": torch.randn(2, 3, 28, 28), "input_ids": torch.randint(3, 30, (3, 5)),
             "attention_mask": torch.ones(3, 5), "image_index": torch.tensor([0, 0, 1]),
             "answer": torch.tensor([1, 2, 3]), "question_type": torch.tensor([0, 1, 0])}
    with torch.no_grad():
        model.eval()
        predicted = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                          batch["image_index"]).logits.argmax(-1)
        model.train()
    metrics = evaluate(model, [batch], torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx((predicted == batch["answer"]).double().mean().item())
    assert model.training  # back in training mode, adapters unmerged, no extra weight copy held
    for name, layer in lora.lora_layers(model):
        assert not layer.merged and layer._merge_buffer is None and torch.equal(layer.weight, weights[name])


def test_a_question_with_every_token_masked_gives_a_finite_answer_whatever_its_tokens():
    model = tiny_model(question_layers=1).eval()  # torch's fast eval path gives a fully masked row nan
    pixels = torch.randn(2, 3, 28, 28)
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with torch.no_grad():
        a = model(pixels, torch.tensor([[2, 5, 7], [0, 0, 0]]), mask).logits
        b = model(pixels, torch.tensor([[2, 5, 7], [4, 8, 9]]), mask).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)  # masked tokens count for nothing


def test_patch_coordinates_are_one_hot_row_and_column():
    model = tiny_model()
    grid_h, grid_w = model.backbone.patch_embed.grid_size
    prefix = model.backbone.num_prefix_tokens
    coords = model.coords[0]
    assert torch.count_nonzero(coords[:prefix]) == 0  # the class token has no position on the grid
    for i in range(grid_h * grid_w):
        row, col = divmod(i, grid_w)
        assert coords[prefix + i].nonzero().flatten().tolist() == [row, grid_h + col]


def test_gated_attention_computes_its_formula():
    from vqa.model import GatedQuestionAttention

    torch.manual_seed(0)
    attention = GatedQuestionAttention(5, 4, 2)  # token width 5, head width 4, 2 heads
    question, tokens = torch.randn(3, 4), torch.randn(3, 6, 5)
    q = attention.query(question).view(3, 1, 2, 4)
    k, v = attention.key(tokens).view(3, 6, 2, 4), attention.value(tokens).view(3, 6, 2, 4)
    gate = torch.sigmoid((q * k).sum(-1) / 4 ** 0.5 - 2.0)  # (3, 6 tokens, 2 heads), the fixed offset -2
    want = torch.cat([(gate.unsqueeze(-1) * v).sum(1).reshape(3, 8), gate.sum(1)], dim=-1)  # sums: soft counts
    torch.testing.assert_close(attention(question, tokens), want)


def test_the_backbone_comes_from_checkpoint_path(tmp_path):
    from safetensors.torch import save_file

    import vit

    source = vit.create_backbone("vit_small_patch14_dinov2", img_size=28, embed_dim=32, depth=2, num_heads=2,
                                 init_values=0.5)
    path = tmp_path / "backbone.safetensors"
    save_file(source.state_dict(), str(path))
    model = tiny_model(checkpoint_path=path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_lora_settings_reach_every_qkv_adapter():
    model = tiny_model(vision_lora_r=2, vision_lora_alpha=5.0, vision_lora_dropout=0.25)
    layers = list(lora.lora_layers(model))
    assert [name for name, _ in layers] == ["backbone.blocks.0.attn.qkv", "backbone.blocks.1.attn.qkv"]
    for _, layer in layers:
        assert (layer.r, layer.splits, layer.scaling, layer.lora_dropout.p) == (2, 3, 2.5, 0.25)


def test_forward_computes_its_formula():
    """Image: standardised backbone tokens through the MLP, then the learned position and the patch coordinates;
    question: masked mean of word plus position embeddings (tokens 0 are padding where no mask is given),
    layer-normed; answer from the gated attention and the question, type from the question alone."""
    import torch.nn.functional as F

    model = tiny_model(question_layers=0).eval()
    norm = model.image_norm  # statistics and affine far from the identity, so that leaving it out shows
    norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2.0)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    pixels, index = torch.randn(2, 3, 28, 28), torch.tensor([1, 0, 1])
    ids = torch.tensor([[4, 9, 2, 0, 0], [7, 3, 3, 8, 5], [2, 9, 4, 0, 0]])
    with torch.no_grad():
        tokens = model.backbone.forward_features(pixels)
        tokens = (tokens - norm.running_mean) / (norm.running_var + norm.eps).sqrt() * norm.weight + norm.bias
        image = torch.cat([model.image_mlp(tokens), model.image_pos.expand(2, -1, -1), model.coords.expand(2, -1, -1)],
                          dim=-1)
        keep = (ids != 0).unsqueeze(-1).float()
        words = model.word_embed(ids) + model.word_pos[:, :5]
        question = F.layer_norm((words * keep).sum(1) / keep.sum(1), (16,), model.question_norm.weight,
                                model.question_norm.bias)
        want = model.answer_head(torch.cat([model.fusion(question, image[index]), question], dim=-1))
        out = model(pixels, ids, image_index=index)
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.type_logits, model.type_head(question))


def test_the_heads_give_fp32_logits_under_autocast():
    """bf16 logits would tie answers a few hundredths apart, and argmax would take the first of them."""
    model = tiny_model().eval()
    seen = {}
    model.answer_head.register_forward_hook(lambda m, args, out: seen.update(answer=args[0]))
    model.type_head.register_forward_hook(lambda m, args, out: seen.update(type=args[0]))
    pixels, ids = torch.randn(3, 3, 28, 28), torch.randint(1, 30, (3, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixels, ids, torch.ones(3, 5))
    assert out.logits.dtype == out.type_logits.dtype == torch.float32
    assert seen["answer"].dtype == seen["type"].dtype == torch.float32
    with torch.no_grad():  # the same inputs through the heads with autocast off: the same numbers, exactly
        assert torch.equal(out.logits, model.answer_head(seen["answer"]))
        assert torch.equal(out.type_logits, model.type_head(seen["type"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_cast_to_another_dtype_runs_its_heads_in_that_dtype(dtype):
    model = tiny_model().eval().to(dtype)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 28, 28, dtype=dtype), torch.randint(1, 30, (3, 5)), torch.ones(3, 5))
    assert out.logits.dtype == out.type_logits.dtype == dtype


@pytest.mark.parametrize("question_layers", [0, 1])
def test_dropout_applies_in_the_question_encoder_layers_and_the_answer_head_only(question_layers):
    """The config's ``dropout``: every dropout outside the backbone has its p, and sits in the question encoder's
    layers (none with question_layers 0, a bag of words) or the answer head; the fusion and image MLP have none."""
    model = tiny_model(dropout=0.3, question_layers=question_layers)
    drops = {name: m.p for name, m in model.named_modules()
             if isinstance(m, torch.nn.Dropout) and not name.startswith("backbone.")}
    assert set(drops.values()) == {0.3}
    assert {name.split(".")[0] for name in drops} == ({"answer_head", "question_encoder"} if question_layers
                                                        else {"answer_head"})


def test_the_type_loss_trains_the_question_encoder_and_not_the_image_side():
    """The question-type head is an auxiliary task on the question encoding: its loss must reach the word embeddings
    and the question encoder (otherwise ``type_loss_weight`` trains the head alone), and nothing of the image side or
    the answer head."""
    model = tiny_model(question_layers=1)
    out = model(torch.randn(2, 3, 28, 28), torch.randint(3, 30, (2, 5)), torch.ones(2, 5))
    out.type_logits.logsumexp(-1).sum().backward()
    assert model.word_embed.weight.grad.abs().sum() > 0 and model.word_pos.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.question_encoder.parameters())
    for module in (model.answer_head, model.fusion, model.image_mlp):
        assert all(p.grad is None for p in module.parameters())


def test_the_answer_loss_of_one_answer_each_is_cross_entropy_whichever_way_the_batch_gives_it():
    logits = torch.randn(5, 7)
    answer = torch.tensor([3, 0, 6, 3, 2])
    weight = torch.rand(7) + 0.1
    as_several = {"answer": answer, "answer_ids": torch.stack([answer, torch.full_like(answer, -1)], 1),
                  "answer_counts": torch.tensor([[1, 0]] * 5)}
    for w in (None, weight):
        expected = F.cross_entropy(logits, answer, weight=w)
        assert torch.equal(answer_loss(logits, {"answer": answer}, w), expected)
        assert torch.allclose(answer_loss(logits, as_several, w), expected)


def test_the_answer_loss_of_several_answers_targets_each_by_its_share_and_weight():
    logits = torch.randn(2, 5, requires_grad=True)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    # Question 0: answer 1 from three people, answer 4 from one, an answer outside the vocabulary from one;
    # question 1: answer 2 alone.
    batch = {"answer": torch.tensor([1, 2]), "answer_ids": torch.tensor([[1, 4, -1], [2, -1, -1]]),
             "answer_counts": torch.tensor([[3, 1, 1], [1, 0, 0]])}
    loss = answer_loss(logits, batch, weight)
    log_p = logits.log_softmax(-1)
    terms = [(2.0 * 3 / 5, log_p[0, 1]), (3.0 * 1 / 5, log_p[0, 4]), (0.5 * 1, log_p[1, 2])]
    expected = -sum(w * lp for w, lp in terms) / sum(w for w, _ in terms)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 1] < 0 < logits.grad[0, 0] and logits.grad[1, 2] < 0  # towards the targets, from the rest


def test_answer_loss_total_is_what_the_answer_loss_divides_by():
    """Times the total, the loss is its sum over the batch's answers, each weighted by its share and class weight:
    what a step of several batches adds up before dividing by all of theirs."""
    logits = torch.randn(4, 6)
    weight = torch.rand(6) + 0.1
    single = {"answer": torch.tensor([5, 0, 0, 3]), "question_type": torch.zeros(4, dtype=torch.long)}
    several = {"answer": torch.tensor([1, 2, 4, 0]), "answer_ids": torch.tensor([[1, 4, -1], [2, -1, -1], [4, 0, 1],
                                                                                  [0, -1, -1]]),
               "answer_counts": torch.tensor([[3, 1, 1], [1, 0, 0], [1, 1, 1], [2, 0, 0]])}
    log_p = logits.log_softmax(-1)
    for w in (None, weight):
        ws = torch.ones(6) if w is None else w
        summed = F.cross_entropy(logits, single["answer"], weight=w, reduction="sum")
        assert answer_loss_total(single, w).item() == pytest.approx(ws[single["answer"]].sum().item(), rel=1e-6)
        assert (answer_loss(logits, single, w) * answer_loss_total(single, w)).item() == pytest.approx(summed.item(),
                                                                                                      rel=1e-5)
        # Question 0's third answer is outside the vocabulary: it keeps its share, and weighs nothing.
        shares = [[(1, 3 / 5), (4, 1 / 5)], [(2, 1.0)], [(4, 1 / 3), (0, 1 / 3), (1, 1 / 3)], [(0, 1.0)]]
        total = sum(ws[a] * p for q in shares for a, p in q)
        summed = -sum(ws[a] * p * log_p[i, a] for i, q in enumerate(shares) for a, p in q)
        assert answer_loss_total(several, w).item() == pytest.approx(total.item(), rel=1e-6)
        assert (answer_loss(logits, several, w) * answer_loss_total(several, w)).item() == pytest.approx(
            summed.item(), rel=1e-5)
