"""The evaluation protocols of 06_eval.py, one file each (protocols/base.py: the interface they implement).

REGISTRY maps each --parts name to its protocol; its order is the canonical order of --parts. To add a protocol:
write protocols/NAME.py with a Protocol subclass (docs/layout.md, "How to add a protocol") and add one line here.
"""
from protocols import emoharbor, esc_eval, interactive, judge, pairwise, reference, sotopia

REGISTRY = {
    "reference": reference.Reference(),  # BLEU, ROUGE-L, Distinct, BERTScore against the human reply (RAPO Table 4)
    "interactive": interactive.Interactive(),  # PPDPP's interactive success: SR, AT, SR@t (RLFF-ESC)
    "judge": judge.Judge(),  # ESC-Eval-style judge dimensions of fixed-length role-plays
    "pairwise": pairwise.Pairwise(),  # pairwise preference between policies, both orders (MT-Bench rule)
    "esc-eval": esc_eval.EscEval(),  # ESC-Eval on role cards (RAPO Tables 6/8)
    "emoharbor": emoharbor.EmoHarbor(),  # EmoHarbor-style user-as-judge on profiles (RAPO Tables 5/7)
    "sotopia": sotopia.Sotopia(),  # Sotopia episodes on a profile folder, seven-dimension evaluator (RAPO Tables 2/9)
}
