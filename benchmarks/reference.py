"""What ours is compared against, on the same backbone: the paper's protocol as its official code runs it (inference,
and the distillation and gate stages at batch 1 with the encoder and generation rerun per image, per epoch), and the
physical floor (one encoder pass + one prefill).

This is a reference implementation of *their* procedure, not a copy of ours: only the loss is shared
(`emovlm_kd.training.trainers.distillation_loss`, the paper's KD objective).
"""

import copy

import torch
import torch.nn.functional as F

from emovlm_kd.training.trainers import distillation_loss

LR, WEIGHT_DECAY = 1e-3, 1e-4  # the official code's Adam settings for the head and the gate


class ReferenceProtocol:
    """The official code's inference on our backbone: a copied visual encoder for the head, sampled generation with
    `pixel_values` (the second encoder pass), the answer parsed to a one-hot vector, then the gate. Batch size 1.

    With a `tokenizer` the answer is decoded and its text parsed, as the official code does; without one, the labels'
    answer tokens are matched.
    """

    def __init__(self, model, tokenizer=None, temperature=0.8):
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = copy.deepcopy(model.vlm.model.visual).eval()  # the official code copies the encoder
        self.temperature = temperature
        text_config = model.vlm.config.get_text_config()
        pad = getattr(model.vlm.generation_config, "pad_token_id", None)
        self.pad = pad if pad is not None else (text_config.pad_token_id or 0)

    def head_features(self, pixel_values, image_grid_thw):
        output = self.encoder(pixel_values, grid_thw=image_grid_thw)
        tokens = output.pooler_output if hasattr(output, "pooler_output") else output
        if isinstance(tokens, (tuple, list)):
            tokens = tokens[0]
        return tokens.mean(0, keepdim=True)  # the whole batch as one image: right only at batch size 1

    def head_probs(self, inputs):
        return self.model.forward_head(self.head_features(inputs["pixel_values"], inputs["image_grid_thw"])).softmax(-1)

    def vlm_vector(self, inputs, new_tokens):
        """Sampled generation forced to `new_tokens` tokens, parsed into the one-hot answer vector."""
        generated = self.model.vlm.generate(
            **inputs,
            do_sample=True,
            temperature=self.temperature,
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            pad_token_id=self.pad,
        )
        vectors, _, _ = self.model.answers_to_vectors(generated[:, inputs["input_ids"].shape[1] :], self.tokenizer)
        return vectors

    def predict(self, inputs, new_tokens):
        probs = self.head_probs(inputs)
        return self.model.forward_gate(self.vlm_vector(inputs, new_tokens), probs)


def lower_bound(model, inputs):
    """The floor: one encoder pass + one prefill of prompt + image (no cache, the last position's logits only)."""
    image_outputs = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
    return model.vlm(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        image_grid_thw=inputs["image_grid_thw"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        mm_encoder_outputs={"image": image_outputs},
        use_cache=False,
        logits_to_keep=1,
    ).logits


def train_head_per_image(reference, head, singles, teacher_logits, labels, epochs, alpha=0.5, tau=2.0):
    """The official distillation stage: every epoch, per image at batch 1, the copied encoder reruns, then one Adam
    step of the KD loss on the head."""
    head.train()
    optimizer = torch.optim.Adam(head.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    dtype = head.classifier.weight.dtype
    for _ in range(epochs):
        for i, single in enumerate(singles):
            with torch.no_grad():
                feature = reference.head_features(single["pixel_values"], single["image_grid_thw"])
            optimizer.zero_grad(set_to_none=True)
            loss = distillation_loss(head(feature.to(dtype)), teacher_logits[i : i + 1], labels[i : i + 1], alpha, tau)
            loss.backward()
            optimizer.step()


def train_gate_per_image(reference, gate, singles, labels, new_tokens, epochs, dtype):
    """The official gate stage: every epoch, per image at batch 1, the copied encoder feeds the head and the VLM
    regenerates its sampled answer, then one Adam step of cross-entropy on the gate."""
    gate.train()
    optimizer = torch.optim.Adam(gate.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for _ in range(epochs):
        for i, single in enumerate(singles):
            with torch.no_grad():
                probs = reference.head_probs(single)
                vector = reference.vlm_vector(single, new_tokens[i])
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(gate(vector.to(dtype), probs.to(dtype)).float(), labels[i : i + 1]).backward()
            optimizer.step()
