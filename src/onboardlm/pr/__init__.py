"""``onboardlm pr``: an onboarded model as a commit on a new branch of a TensorRT-LLM checkout."""

from onboardlm.pr.layout import PrError, TrtllmCheckout
from onboardlm.pr.make import PrPlan, PrResult, make_pr, plan_pr

__all__ = ["PrError", "PrPlan", "PrResult", "TrtllmCheckout", "make_pr", "plan_pr"]
