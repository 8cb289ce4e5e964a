"""VQA with the trained encoder in an MLLM (paper Table 2; the `vqa` evaluator, a training one).

    data          (image, question, answer, category) examples from shard datasets: captions (stage 1), QA (stage 2),
                  the evaluation split's questions
    model         VqaModel: frozen backbone + the caption head's projector and LLM; save / load
    train         the two stages (projector on captions; projector + LLM on VQA), greedy prediction
    metrics       exact match after the VQA normalisation (any alternative answer), the option letter for
                  multiple-choice questions (VLMEvalKit's can_infer); the blind-guess chance level
    predictions   VLMEvalKit's prediction file (`<model>_<dataset>.tsv`: index, question, answer, category, the
                  option columns A, B, ... of multiple-choice questions, prediction)
    protocol      `vqa_eval(candidate, benchmark, cfg)` -> EvalResult, and its result files
    lmms_adapter  an lmms-eval model wrapping a saved VqaModel, and a local lmms-eval task of the evaluated
                  questions
"""

from __future__ import annotations
