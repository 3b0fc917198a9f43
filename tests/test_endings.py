"""How answers ended (alpaca_sft/eval/endings.py), the intervals and paired tests (stats.py), and their counts
per model and prompt file (scoring.py): pure functions on made-up answers."""

import pytest

from alpaca_sft.data.template import render_prompt, render_sql_prompt
from alpaca_sft.eval.endings import CUT, EOS, LOOPED, RAN_ON, classify, repeated_tail
from alpaca_sft.eval.prompts import EvalPrompt
from alpaca_sft.eval.scoring import paired_tests, score
from alpaca_sft.eval.stats import mcnemar_exact, wilson
from alpaca_sft.models.generation import Generation

ALPACA = render_prompt("Name three keys of a piano.")
SCHEMA = "CREATE TABLE t (a VARCHAR)"
SQL = render_sql_prompt("Which a?", SCHEMA)
RECIPE = "\n".join(f"{i}. {step}" for i, step in enumerate(
    ["Preheat the oven to 180 C.", "Mix the flour and the sugar.", "Add two eggs and beat well.",
     "Pour the batter into a tin.", "Bake for forty minutes.", "Let it cool before slicing."], start=1))


def ending(text, stop="length", prompt=ALPACA):
    return classify(text, stop, prompt)


def test_an_answer_that_stopped_by_eos_is_eos_whatever_it_holds():
    assert ending("A Major: A Major: A Major: A Major: A Major:", stop="eos").answer_class == EOS
    assert ending("C.\n\n### Input:\nD", stop="eos").answer_class == EOS


@pytest.mark.parametrize("text,line", [
    # The untuned base answers, then writes blocks of the template (README: the showcase's "before")
    ("The class has a frequency of 91.5 MHz.\n\n### Output:\nWhich class?\n\n### Input:\nWhich class?\n\n### Con",
     "### Output:"),  # a heading in the template's layout that the template does not have
    ("Responsive design adapts.\n\n### Task:\nDescribe the design.\n\n### Task:\nDescribe", "### Task:"),
    ("SELECT a FROM t\n\n### Response:\nSELECT a FROM t", "### Response:"),
    # ...or the prompt's own preamble again, as a new example
    ("C, D and E.\n\nBelow is an instruction that describes a task. Write a response that appropriately",
     "Below is an instruction that describes a task. Write a response that appropriately"),
])
def test_an_answer_that_writes_new_prompt_blocks_ran_on(text, line):
    result = ending(text)
    assert result.answer_class == RAN_ON and result.detail == line


def test_a_verbatim_prompts_own_layout_repeated_is_a_run_on():
    prompt = "Question: What is two plus two?\nAnswer:"
    result = classify("4\n\nQuestion: What is three plus three?\nAnswer: 6\n\nQuestion: What is", "length", prompt)
    assert result.answer_class == RAN_ON and result.detail == "Answer: 6"
    assert classify("4, since two and two make four, as anyone who has counted on", "length", prompt).answer_class == CUT


@pytest.mark.parametrize("text,span", [
    ("A Major: " * 40 + "A Ma", "A Major: "),  # one phrase again and again, cut mid-copy
    ("The keys are C, D and E.\n" + "\n".join(f"{i}. A Major" for i in range(1, 40)) + "\n40. A", "#. A Major\n"),  # renumbered
    ("Some intro. " + ("The piano has eighty-eight keys, fifty-two white and thirty-six black. " * 4)[:-9],
     "The piano has eighty-eight keys, fifty-two white and thirty-six black. "),  # a long span, cut in its 4th copy
    ("Done.\n" + "\n" * 40, "\n"),  # newlines to the limit
    ("SELECT COUNT(*) FROM t WHERE x = 1000000000000000000000000000000000000000000000000000", "0"),
    # numbers aside: the same item renumbered, a join chain with its aliases counting up, counting itself
    ("Tips:\n" + "\n".join(f"{i}. Eat a variety of healthy fats" for i in range(1, 47)) + "\n4", "#. Eat a variety of healthy fats\n"),
    ("SELECT * FROM m AS T1 " + " ".join(f"JOIN CAR_MAKERS AS T{i + 1} ON T{i}.Id = T{i + 1}.Model" for i in range(1, 9)),
     " JOIN CAR_MAKERS AS T# ON T#.Id = T#.Model"),
    ("\n".join(str(n) for n in range(1, 300)), "#\n"),
])
def test_an_answer_whose_tail_repeats_one_span_looped(text, span):
    result = ending(text)
    assert result.answer_class == LOOPED
    found, copies = repeated_tail(text)  # the span as the repeats first show it: the one given, or a rotation of it
    assert len(found) == len(span) and span in found * 2 and copies >= 3 and result.detail == f"{found!r} x {copies}"


@pytest.mark.parametrize("text", [
    RECIPE + "\n7. Serve with cr",  # a real list, numbered: each item differs
    "Pi is 3.14159265358979323846264338327950288419716939937510582097494459230781640628620899862803482534211706798",
    "The piano is a keyboard instrument whose strings are struck by hammers; it was invented around 1700 by "
    "Bartolomeo Cristofori in Florence, and its range of seven octaves and a minor third lets it play",
    "| key | colour |\n|---|---|---|---|",  # a table rule: short repeats are not loops
    "## Steps\n\n### Step 1: Preheat the oven\n\nSet it to 180 C and wait until the light goes out, then",  # headings
    "Wait for it......",
    "Ha ha ha ha ha ha",  # under LOOP_MIN_CHARS
    ("Two copies of one long sentence are not yet a loop. " * 2)[:-3],
])
def test_an_answer_cut_at_the_limit_that_neither_ran_on_nor_looped_is_cut(text):
    assert ending(text).answer_class == CUT and repeated_tail(text) is None


def test_a_run_on_that_also_loops_counts_as_a_run_on():
    assert ending("C.\n\n### Instruction:\nName keys.\n\n### Response:\nC.\n\n" * 5).answer_class == RAN_ON


def test_wilson_interval():
    assert wilson(0, 0) is None
    low, high = wilson(0, 10)
    assert low == 0 and high == pytest.approx(3.8415 / 13.8415, abs=1e-4)  # z^2 / (n + z^2) at 0 successes
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook value
    low, high = wilson(1297, 1514)  # 85.7% on the 1,514 prompts: about +-1.8 points
    assert 0.838 < low < 0.840 and 0.873 < high < 0.875


def test_mcnemar_exact_counts_only_the_discordant_prompts():
    assert mcnemar_exact(0, 0) == 1 and mcnemar_exact(5, 5) == 1
    assert mcnemar_exact(0, 5) == mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    # "83.8% vs 86.5%" on 1,514 prompts is 41 prompts apart: chance if they split 60/101, not if 0/41
    assert mcnemar_exact(60, 101) > 0.001 and mcnemar_exact(0, 41) < 1e-11
    assert mcnemar_exact(200, 240) == pytest.approx(0.0630, abs=1e-3)  # exact at large counts too


def prompts_in_two_files():
    return [EvalPrompt("a1", ALPACA, reference="C, D, E", group="alpaca"),
            EvalPrompt("a2", ALPACA, group="alpaca"),
            EvalPrompt("s1", SQL, reference="SELECT a FROM t", schema=SCHEMA, group="sql")]


def answers(*pairs):
    return [Generation(text, stop, 4, 0.5) for text, stop in pairs]


def test_scores_count_classes_and_rates_per_prompt_file_with_intervals():
    prompts = prompts_in_two_files()
    summary, judged = score(prompts, answers(("C, D, E", "eos"), ("A Major: " * 10, "length"),
                                             ("SELECT a FROM t", "eos")))
    assert [j.answer_class for j in judged] == [EOS, LOOPED, EOS]
    assert summary["classes"] == {"eos": 2, "ran_on": 0, "looped": 1, "cut": 0}
    assert summary["counts"]["stopped_by_eos"] == [2, 3] and summary["intervals"]["stopped_by_eos"] == wilson(2, 3)
    assert summary["counts"]["exact_match"] == [2, 2] and summary["counts"]["sql_executes"] == [1, 1]
    alpaca, sql = summary["groups"]["alpaca"], summary["groups"]["sql"]
    assert alpaca["prompts"] == 2 and alpaca["stopped_by_eos"] == 0.5 and alpaca["sql_executes"] is None
    assert alpaca["classes"]["looped"] == 1 and sql["classes"]["eos"] == 1 and sql["sql_result_match"] == 1
    # the run's speeds: 3 answers of 4 new tokens, each 0.5 s of the run's wall time
    assert summary["prompts_per_second"] == 2 and summary["new_tokens_per_second"] == 8
    assert "prompts_per_second" not in alpaca and "new_tokens_per_second" not in alpaca


def test_paired_tests_compare_models_on_the_same_prompts():
    prompts = prompts_in_two_files()
    generations = {"base": answers(("x", "length"), ("y", "length"), ("z", "length")),
                   "a": answers(("C, D, E", "eos"), ("y", "eos"), ("z", "length")),
                   "b": answers(("x", "eos"), ("y", "length"), ("SELECT a FROM t", "eos"))}
    judgments = {name: score(prompts, gens)[1] for name, gens in generations.items()}
    tests = paired_tests(prompts, generations, judgments)
    assert {(t["a"], t["b"]) for t in tests} == {("base", "a"), ("base", "b"), ("a", "b")}
    stop = {(t["a"], t["b"], t["group"]): t for t in tests if t["metric"] == "stopped_by_eos"}
    assert set(stop) == {(a, b, g) for a, b in [("base", "a"), ("base", "b"), ("a", "b")] for g in ("all", "alpaca", "sql")}
    a_vs_b = stop[("a", "b", "all")]
    assert (a_vs_b["only_a"], a_vs_b["only_b"]) == (1, 1) and a_vs_b["difference"] == 0 and a_vs_b["p_value"] == 1
    assert stop[("base", "a", "alpaca")]["only_b"] == 2 and stop[("base", "a", "sql")]["prompts"] == 1
    sql = [t for t in tests if t["metric"] == "sql_result_match" and t["group"] == "all"]
    assert [(t["a"], t["b"], t["prompts"], t["only_b"]) for t in sql] == [("base", "a", 1, 0), ("base", "b", 1, 1),
                                                                         ("a", "b", 1, 1)]
