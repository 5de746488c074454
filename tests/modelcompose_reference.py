"""The published ModelCompose preprocess, restated in its own steps (references for tests).

- `published_prompt`: `preprocess_v1`'s turn handling (a first turn not from the human is skipped,
  roles must alternate) and `Conversation.get_prompt` for separator style TWO (a turn with no
  message renders "ROLE:"), used by training and by `model_multimodal_qa_loader` alike;
- `published_modal_tokens`: `tokenizer_modal_token` with `split_string_by_list` (scanned character
  by character, every chunk tokenised with BOS, BOS kept once);
- `published_labels`: `preprocess_v1`'s masking: rounds cut at sep2, instruction length
  len(tok(instruction + " ASSISTANT: ")) - 2, whole sample masked on a length mismatch.
"""

from __future__ import annotations

from mcomp.conversation import IGNORE_INDEX

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


def published_prompt(conversations) -> str:
    source = list(conversations)
    if source[0]["from"] != "human":
        source = source[1:]
    text = SYSTEM + " "
    for j, sentence in enumerate(source):
        role = {"human": "USER", "gpt": "ASSISTANT"}[sentence["from"]]
        assert role == ("USER", "ASSISTANT")[j % 2]
        if sentence["value"]:
            text += role + ": " + sentence["value"] + (" ", "</s>")[j % 2]
        else:
            text += role + ":"
    return text


def published_modal_tokens(prompt: str, tokenizer, tags: dict[str, int]) -> list[int]:
    chunks, current = [], ""
    for char in prompt:
        current += char
        found = [t for t in tags if t in current]
        if found:
            text, _ = current.split(found[0], 1)
            chunks.append((text, found[0]))
            current = ""
    if current:
        chunks.append((current, None))
    chunk_ids = [tokenizer(text).input_ids for text, _ in chunks]
    ids, offset = [], 0
    if chunk_ids and chunk_ids[0] and chunk_ids[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunk_ids[0][0])
    for (_, tag), piece in zip(chunks, chunk_ids):
        ids.extend(piece[offset:])
        if tag is not None:
            ids.append(tags[tag])
    return ids


def published_labels(conversation: str, ids: list[int], tokenizer, tags: dict[str, int]) -> list[int]:
    target = list(ids)
    total = sum(t != tokenizer.pad_token_id for t in ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE_INDEX] * cur
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(published_modal_tokens(rou, tokenizer, tags))
        instruction_len = len(published_modal_tokens(parts[0], tokenizer, tags)) - 2
        for k in range(cur, min(cur + instruction_len, len(target))):
            target[k] = IGNORE_INDEX
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * len(target[cur:])
    if cur != total:
        target = [IGNORE_INDEX] * len(target)
    return target
