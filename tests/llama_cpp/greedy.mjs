// Greedy decoding of a GGUF file in llama.cpp (through node-llama-cpp's prebuilt CPU binary), printed as JSON.
//
// Why the low-level API: a chat session or completion helper would add its own chat wrapper text, stop
// strings and sampling defaults. Here the prompt tokens are exactly the ones given (or llama.cpp's own
// tokenization of the given text, special tokens parsed), and each next token is the argmax
// (temperature 0: llama.cpp's greedy sampler, no repetition penalty, no grammar, no token bias).
//
// Usage:
//   node greedy.mjs MODEL.gguf --n 16 --prompt "<|im_start|>user\nHi<|im_end|>\n"   (tokenized by llama.cpp)
//   node greedy.mjs MODEL.gguf --n 16 --ids 1,42,7                                  (token ids as given)
//   node greedy.mjs MODEL.gguf --lora ADAPTER.gguf --n 16 --ids 1,42,7       (a GGUF LoRA applied at scale 1)
// Output (stdout, one JSON object): prompt_ids (what was evaluated), generated (token ids, stops early
// only at an end-of-generation token, which is then included), add_bos (the GGUF's tokenizer.ggml.add_bos_token
// as llama.cpp reads it), bos, eos, vocabulary_type, n_ctx, log (llama.cpp's warnings and errors).
//
// Nothing is downloaded or built: build "never" and skipDownload make getLlama use the installed prebuilt
// binary or fail.

import {parseArgs} from "node:util";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const {values, positionals} = parseArgs({
    allowPositionals: true,
    options: {
        n: {type: "string", default: "16"},
        prompt: {type: "string"},
        ids: {type: "string"},
        "context-size": {type: "string", default: "512"},
        lora: {type: "string"},
        threads: {type: "string", default: "2"}
    }
});

function fail(message) {
    process.stdout.write(JSON.stringify({error: message, log}) + "\n");
    process.exit(2);
}

const log = [];
if (positionals.length !== 1)
    fail("expected exactly one GGUF path");
if ((values.prompt == null) === (values.ids == null))
    fail("give exactly one of --prompt and --ids");
const n = Number.parseInt(values.n, 10);
const contextSize = Number.parseInt(values["context-size"], 10);

const llama = await getLlama({
    gpu: false,
    build: "never",
    skipDownload: true,
    usePrebuiltBinaries: true,
    progressLogs: false,
    maxThreads: Number.parseInt(values.threads, 10),
    logLevel: LlamaLogLevel.warn,
    logger: (level, message) => log.push(`${level}: ${message.trimEnd()}`)
});

let model;
try {
    model = await llama.loadModel({modelPath: positionals[0], gpuLayers: 0});
} catch (err) {
    // llama.cpp's log lines reach the logger asynchronously: let them arrive before reporting.
    await new Promise((resolve) => setTimeout(resolve, 500));
    fail(`llama.cpp could not load the model: ${err?.message ?? err}`);
}

let promptIds;
if (values.ids != null) {
    promptIds = values.ids.split(",").filter((s) => s !== "").map((s) => Number.parseInt(s, 10));
} else {
    // What llama.cpp's own tools do (common_tokenize with add_special and parse_special): special-token text
    // becomes the special token, and BOS is prepended when the GGUF asks for it.
    promptIds = model.tokenize(values.prompt, true);
    if (model.tokens.shouldPrependBosToken && model.tokens.bos != null && promptIds[0] !== model.tokens.bos)
        promptIds = [model.tokens.bos, ...promptIds];
}
if (promptIds.length + n > contextSize)
    fail(`prompt (${promptIds.length} tokens) + n (${n}) does not fit in a context of ${contextSize} tokens`);

let context;
try {
    // llama.cpp's --lora: the adapter is applied to the model's weights in this context, at scale 1.
    const lora = values.lora == null ? undefined : {adapters: [{filePath: values.lora, scale: 1}]};
    context = await model.createContext({contextSize, batchSize: contextSize, sequences: 1, lora});
} catch (err) {
    await new Promise((resolve) => setTimeout(resolve, 500));
    fail(`llama.cpp could not create the context${values.lora == null ? "" : " with the LoRA"}: ${err?.message ?? err}`);
}
const sequence = context.getSequence();
const generated = [];
// yieldEogToken: an end-of-turn token is part of what we compare (transformers' argmax yields it too).
for await (const token of sequence.evaluate(promptIds, {temperature: 0, yieldEogToken: true})) {
    generated.push(token);
    if (generated.length >= n || model.isEogToken(token))
        break;
}

process.stdout.write(JSON.stringify({
    prompt_ids: Array.from(promptIds),
    generated,
    add_bos: model.tokens.shouldPrependBosToken,
    bos: model.tokens.bos,
    eos: model.tokens.eos,
    vocabulary_type: model.vocabularyType,
    n_ctx: context.contextSize,
    log
}) + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
