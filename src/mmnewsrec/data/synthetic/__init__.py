"""Deterministic synthetic MIND-format data with topics, images and a known click model.

Written under OUT (byte-identical for a seed):
    train/news.tsv, train/behaviors.tsv, dev/news.tsv, dev/behaviors.tsv   raw MIND format
    images/<news_id>.jpg   for about half of the news; with image_layout "im-mind" instead
                           images/<index>.jpg, a 610 x 195 card for every news (photo or blank
                           box, then the title), and projector.csv (nid, IM-MIND-INDEX)
    dev/oracle.tsv         header + (impression_id, news_id, probability) per dev candidate
    truth/news.tsv         header + hidden news attributes (news_id, tier, style, published, buzz)
    truth/users.tsv        header + hidden user attributes (user_id, interests, style)
    manifest.json          the configuration and the summary

News. Each news item n has a subcategory s(n) inside a category c(n) (11 categories, 31
subcategories), a quality tier q(n) in {-1, 0, +1}, a publication time, a hidden appeal ("buzz")
b(n) ~ N(0, 1) that neither text nor image shows, and for about half of
the news an image with a visual style v(n) in {stripes, smooth}. The title and abstract are built
from the subcategory's vocabulary plus shared filler, so a sentence encoder separates topics.
The tier shows in the text: tier +1 titles start with "Analysis:", "Exclusive:", ... and the
abstract ends with a sentence about verified reporting; tier -1 titles start with "Rumor:",
"Unverified:", ... and the abstract ends with a sentence saying the claim is unconfirmed; tier 0
has neither. The image shows the topic (hue from the category, shape from the subcategory) and
the style (striped or smooth background); the text says nothing about the style.

Users. Each user has 1-3 interest subcategories I(u) (C(u): their categories) and, for half of
the users, a preferred visual style p(u).

Click model. The utility of news n for user u at time t is
    z = 3.5 [s(n) in I(u)] + 0.6 [c(n) in C(u) and s(n) not in I(u)] + 1.0 q(n)
        + 2.0 [n has an image of style p(u)] - 0.5 age_days(n, t) + 1.0 b(n)
(weights in `ClickModel`), and w = exp(z).
- History: h(u) clicks (1% empty, otherwise 1-50, median 30) on distinct archive news
  (published before the first impression), drawn without replacement with probability
  proportional to w (Plackett-Luce, no age or buzz term), ordered by publication time. So a history
  shows the user's interests and, through its images, the preferred style.
- Impression: a user (by a log-normal activity), a time (train: 5 days, dev: the day after),
  K ~ U{5..50} distinct candidates published in the last 2 days; each draw comes from one of the
  user's interest subcategories with probability 0.15, otherwise from all recent news.
- Clicks: m ~ {1: 0.6, 2: 0.25, 3: 0.15} clicks drawn without replacement with probability
  proportional to w (Plackett-Luce, sampled as Gumbel top-m).
- Oracle: oracle.tsv holds each dev candidate's exact click probability
  sum_m P(m) P(candidate among the first m draws). It is increasing in w, so ranking by it is the
  Bayes-optimal ranking for per-impression AUC.

What a model sees. Interests, category affinity and quality are visible in the news text, the
style only in the image; they are visible to a model that reads text and image vectors of the
history and the candidate. The age and buzz terms are hidden from the content: they show only in
behaviour, as the popularity and freshness signals of `mmnewsrec.data.signals` (clicks of
earlier impressions on the same news, time since its first appearance). At the default size the
dev oracle AUC is 0.912; ranking by the content terms only gives 0.873, and without the style
term as well 0.855 (the summary and manifest.json report these three figures for every data
set). A model must also infer I(u) and p(u) from the history. Candidates are never history
news, so the co-click signal is 0 on this data.
"""

from mmnewsrec.data.synthetic.click_model import ClickModel, SynthConfig, click_probability
from mmnewsrec.data.synthetic.writer import SynthSummary, generate

__all__ = ["ClickModel", "SynthConfig", "SynthSummary", "click_probability", "generate"]
