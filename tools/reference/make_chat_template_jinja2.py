"""Renders the chat templates in tests/golden/chat-templates with Python's Jinja2 under the settings
transformers' apply_chat_template uses (a sandboxed environment with trim_blocks and lstrip_blocks, its
tojson and raise_exception), and writes <model>/renders_jinja2.json beside @huggingface/jinja's
renders.json (make_chat_template_golden.mjs). Where the two renderers disagree, the test expects
Python's (what training with transformers sees). Run with Debian's python3 (python3-jinja2):
    /usr/bin/python3 make_chat_template_jinja2.py ../../tests/golden/chat-templates
"""
import json
import os
import sys
from datetime import datetime

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def environment():
    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda f: datetime.now().strftime(f)
    return env


def main(out):
    data = json.load(open(os.path.join(out, "conversations.json"), encoding="utf-8"))
    env = environment()
    for model in sorted(os.listdir(out)):
        folder = os.path.join(out, model)
        if not os.path.isdir(folder):
            continue
        config = json.load(open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8"))
        template = env.from_string(config["chat_template"])
        special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k) is not None}
        renders = []
        for conversation in data["conversations"]:
            for add in (False, True):
                variables = dict(special, messages=conversation["messages"], add_generation_prompt=add)
                if conversation.get("tools"):
                    variables["tools"] = data["tools"]
                entry = {"conversation": conversation["name"], "add_generation_prompt": add}
                try:
                    entry["text"] = template.render(**variables)
                except Exception as e:  # the template's own refusals and type errors alike
                    entry["error"] = str(e)
                renders.append(entry)
        with open(os.path.join(folder, "renders_jinja2.json"), "w", encoding="utf-8") as f:
            json.dump(renders, f, ensure_ascii=False, indent=1)
            f.write("\n")
        js = json.load(open(os.path.join(folder, "renders.json"), encoding="utf-8"))
        differ = [r["conversation"] + (" +gen" if r["add_generation_prompt"] else "") for r, j in zip(renders, js)
                  if r.get("text") != j.get("text") or ("error" in r) != ("error" in j)]
        print(f"{model}: {len(differ)} of {len(renders)} differ from @huggingface/jinja {differ}")


if __name__ == "__main__":
    main(sys.argv[1])
