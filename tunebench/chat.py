"""Conversations through a chat template: rows of turns -> token ids and labels, the loss on assistant turns.

A conversation is a list of turns {role, content} (the `messages` shape of TRL, axolotl and
LLaMA-Factory; ShareGPT's {from, value} turns are read as the same). It is rendered with the
model's own chat template (tokenizer.apply_chat_template), or, for a model without one, with
DEFAULT_TEMPLATE, or with the template data.chat_template names.

Which tokens an assistant turn owns is found without {% generation %} tags, which most templates
(SmolLM2's among them) lack: the conversation is rendered prefix by prefix. The text an assistant
turn adds is what rendering the turns up to it adds to rendering the turns before it with the
generation prompt (the "<|im_start|>assistant\\n" a model is given at inference). Of that text's
tokens, the reply and the first special token after it (the end-of-turn token: <|im_end|>,
GPT-2's <|endoftext|>) are scored; what the template adds after the end-of-turn token (a newline)
is not. Every piece is tokenized apart, so the prompt side of each turn is exactly the tokens a
model is given when asked for that turn.
"""
from pathlib import Path

# ShareGPT's speaker names -> roles.
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}

# For a model without a chat template: Zephyr's (also TinyLlama-Chat's) turns, each ended by the
# tokenizer's end-of-text token, so that a model trained on it stops where a reply ends.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {"zephyr": DEFAULT_TEMPLATE, "chatml": CHATML}


class BadConversation(ValueError):
    """A row that cannot be trained on; its message is the reason, counted by kind."""


def choose_template(tokenizer, named: str = None) -> tuple:
    """(template text, where it comes from): data.chat_template (a built-in name, a .jinja file or
    the template itself), else the model's own, else the default."""
    from tunebench.errors import UserError

    if named:
        if named in TEMPLATES:
            return TEMPLATES[named], f"built-in template '{named}'"
        if named.endswith((".jinja", ".j2")):
            path = Path(named)
            if not path.is_file():
                raise UserError(f"data.chat_template file '{named}' does not exist")
            return path.read_text(encoding="utf-8"), f"template file {named}"
        if "{{" in named or "{%" in named:
            return named, "the recipe's template (data.chat_template)"
        raise UserError(f"data.chat_template '{named}' is neither a built-in template ({', '.join(TEMPLATES)}), "
                        "a .jinja file nor a Jinja template text")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, "the model's chat template"
    return DEFAULT_TEMPLATE, "tunebench's default template 'zephyr' (the model has no chat template)"


def turns(row_turns) -> list:
    """A row's turns as [{role, content}], roles checked: an optional system turn, then user and
    assistant turns alternating from a user turn; turns after the last assistant turn are dropped
    (nothing follows them to learn). Raises BadConversation."""
    if not isinstance(row_turns, list) or not row_turns:
        raise BadConversation("no turns")
    messages = []
    for turn in row_turns:
        if not isinstance(turn, dict):
            raise BadConversation("a turn that is not {role, content}")
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if role not in ROLE_NAMES:
            raise BadConversation(f"unknown role {role!r}")
        if not isinstance(content, str):
            raise BadConversation("a turn without text")
        messages.append({"role": ROLE_NAMES[role], "content": content})
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise BadConversation("no assistant turn")
    body = roles[1:] if roles[0] == "system" else roles
    if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(body)):
        raise BadConversation("roles out of order")
    last = max(i for i, role in enumerate(roles) if role == "assistant")
    messages = messages[: last + 1]
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise BadConversation("an empty assistant turn")
    return messages


def render(tokenizer, template: str, messages: list, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template may refuse a conversation (raise_exception) or fail on it
        raise BadConversation(f"the template fails to render it ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None


def end_of_turn_ids(tokenizer) -> set:
    """The special tokens: the first after a reply ends the reply's scored tokens."""
    return {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} | {tokenizer.eos_token_id}


def encode(tokenizer, template: str, messages: list, scored_turns=None) -> tuple:
    """(input_ids, spans): the conversation's tokens and, per scored assistant turn, its (start,
    end) token positions: the reply and its end-of-turn token. scored_turns: indices of the turns
    to score (default every assistant turn). Raises BadConversation."""
    if scored_turns is None:
        scored_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    full = render(tokenizer, template, messages)
    pieces, owned, at = [], [], 0  # text pieces; for a reply piece, how many of its tokens are scored
    for i in scored_turns:
        start = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, template, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(start) and len(start) >= at):
            raise BadConversation("the template does not render it turn by turn (a turn's text changes with later turns)")
        pieces += [full[at : len(start)], full[len(start) : len(upto)]]
        owned += [None, True]
        at = len(upto)
    pieces.append(full[at:])
    owned.append(None)
    special = end_of_turn_ids(tokenizer)
    ids, spans = [], []
    for piece_ids, is_reply in zip(tokenizer(pieces, add_special_tokens=False)["input_ids"], owned):
        if is_reply:
            reply = len(piece_ids)
            ends = [j for j, t in enumerate(piece_ids) if t in special]
            if ends:
                reply = ends[0] + 1
            if reply <= (1 if ends else 0):
                raise BadConversation("an empty assistant turn")
            spans.append((len(ids), len(ids) + reply))
        ids += piece_ids
    return ids, spans


def fit(ids: list, spans: list, max_length: int) -> tuple:
    """(ids, spans, cut) in max_length tokens: the conversation up to its last assistant turn that
    ends within max_length (whole turns); if even the first reply does not fit, that reply is cut
    at its end. (None, None, True) when no scored token fits."""
    if len(ids) <= max_length:
        return ids, spans, False
    whole = [span for span in spans if span[1] <= max_length]
    if whole:
        return ids[: whole[-1][1]], whole, True
    start = spans[0][0]
    if start >= max_length - 1:  # not even one reply token would fit after the prompt side
        return None, None, True
    return ids[:max_length], [(start, max_length)], True


def labels_for(ids: list, spans: list, train_on_prompt: bool) -> list:
    if train_on_prompt:
        return list(ids)
    labels = [-100] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return labels
