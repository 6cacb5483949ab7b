"""The shipped models and how they are built: the tiny arith policies (a character tokenizer, small
Llama models, SFT from scratch), the learned PRM of the embedded task, and SmolLM2-135M-Instruct as a
policy folder."""
