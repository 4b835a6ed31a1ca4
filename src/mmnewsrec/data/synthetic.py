"""Deterministic synthetic MIND-format data with topics, images and a known click model.

Written under OUT (byte-identical for a seed):
    train/news.tsv, train/behaviors.tsv, dev/news.tsv, dev/behaviors.tsv   raw MIND format
    images/<news_id>.jpg   for about half of the news
    dev/oracle.tsv         header + (impression_id, news_id, probability) per dev candidate
    truth/news.tsv         header + hidden news attributes (news_id, tier, style, published)
    truth/users.tsv        header + hidden user attributes (user_id, interests, style)
    manifest.json          the configuration and the summary

News. Each news item n has a subcategory s(n) inside a category c(n) (11 categories, 31
subcategories), a quality tier q(n) in {-1, 0, +1}, a publication time, and for about half of
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
        + 2.0 [n has an image of style p(u)] - 0.3 age_days(n, t)
(weights in `ClickModel`), and w = exp(z).
- History: h(u) clicks (1% empty, otherwise 1-50, median 30) on distinct archive news
  (published before the first impression), drawn without replacement with probability
  proportional to w (Plackett-Luce, no age term), ordered by publication time. So a history
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
style only in the image; everything except the age term is visible to a model that reads text and
image vectors of the history and the candidate. The age term is hidden (models do not see
publication times) and small. At the default size the dev oracle AUC is 0.895; ranking by the
visible terms only gives 0.893, and without the style term as well 0.871 (the summary and
manifest.json report these three figures for every data set). A model must also infer I(u) and
p(u) from the history, which costs about 0.01 more.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image
from tqdm.auto import tqdm

from mmnewsrec.data.store import atomic_dir, csr_offsets
from mmnewsrec.evaluate.metrics import evaluate_scores

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_KIND = "mmnewsrec synthetic MIND data"
DAY = 86_400
START = int(datetime(2019, 11, 9, tzinfo=UTC).timestamp())  # first train impression
TRAIN_DAYS, DEV_DAYS = 5, 1
WINDOW_DAYS = 2  # candidates are news published in the last WINDOW_DAYS
ARCHIVE_DAYS = 21  # history news are published up to this long before the window
ARCHIVE_SHARE = 0.3
TIERS = np.array([-1, 0, 1])
TIER_SHARES = (0.25, 0.5, 0.25)
HISTORY_MEDIAN, HISTORY_SIGMA = 30, 0.5  # log-normal history length, clipped to 1..50
EMPTY_HISTORIES = 0.01
CHUNK_USERS = 8192  # bounds memory; part of the random stream, so fixed
CHUNK_IMPRESSIONS = 16384

# (category, subcategory): subjects | predicates | detail sentences (any subject fits any predicate)
VOCABULARY: dict[tuple[str, str], tuple[str, str, str]] = {
    ("sports", "football"): (
        "Chiefs quarterback|Eagles defense|Rookie running back|Veteran kicker|"
        "Cowboys head coach|Packers wide receiver",
        "leads late comeback in overtime thriller|scores twice in win over division rival|"
        "is ruled out with ankle injury before Sunday|agrees to contract extension|"
        "breaks franchise record for touchdowns|faces tough questions after playoff loss",
        "The team has won four of its last five games.|Coaches expect a tight race for the "
        "division title.|Fans packed the stadium despite freezing rain.",
    ),
    ("sports", "basketball"): (
        "Lakers forward|Celtics point guard|NBA rookie center|Bucks head coach|"
        "Warriors sharpshooter|Knicks bench unit",
        "drops career-high 41 points in road win|hits buzzer-beater to stun conference leaders|"
        "misses practice with sore hamstring|dominates the paint in double-overtime victory|"
        "is fined after heated exchange with referees|sparks fourth-quarter rally from deep",
        "The team now sits second in the conference standings.|The arena erupted after the "
        "final shot.|Scouts praised the ball movement and rebounding.",
    ),
    ("sports", "tennis"): (
        "Wimbledon champion|Top-seeded Spanish player|Teenage qualifier|Former world number one|"
        "Doubles specialists|Rising Canadian star",
        "wins five-set marathon on center court|withdraws from the Open with wrist injury|"
        "saves three match points to reach the semifinal|hires a new coach before grass season|"
        "serves 30 aces in straight-sets victory|climbs into the top ten of the rankings",
        "The match lasted more than four hours under the roof.|Tournament officials delayed "
        "play because of rain.|The serve and forehand looked sharper than ever.",
    ),
    ("sports", "golf"): (
        "Masters winner|Veteran golfer|College amateur|European Ryder Cup captain|"
        "Former US Open champion|LPGA rookie",
        "shoots bogey-free 64 to take the lead|makes hole-in-one on the par-3 seventh|"
        "misses the cut after a double bogey finish|wins playoff on the 18th green|"
        "changes putter before the final round|climbs the leaderboard with eagle on the back nine",
        "Windy conditions made the course play long.|The gallery followed every shot on the "
        "final nine holes.|The tour heads to Florida for next week's event.",
    ),
    ("finance", "markets"): (
        "Wall Street stocks|Tech shares|Blue-chip indexes|Oil prices|Bank stocks|Treasury yields",
        "rally as the Federal Reserve signals a rate pause|slide after weak quarterly earnings|"
        "hit record highs on strong jobs report|swing wildly as investors weigh trade talks|"
        "fall for a third straight session|rebound as inflation cools",
        "Analysts expect volatility ahead of the central bank meeting.|Trading volume was well "
        "above its monthly average.|Investors rotated out of growth stocks into utilities.",
    ),
    ("finance", "realestate"): (
        "Home prices|Mortgage rates|Housing starts|Luxury condo sales|Rental costs|"
        "Suburban home listings",
        "climb to the highest level in a decade|drop as buyers pull back|"
        "surge in booming Sun Belt cities|stall ahead of the spring buying season|"
        "squeeze first-time buyers in big cities|ease for the first time this year",
        "Real estate agents report bidding wars on starter homes.|The median listing now sits "
        "above 400,000 dollars.|Builders are struggling with lumber and labor costs.",
    ),
    ("finance", "personalfinance"): (
        "Retirement savers|Credit card holders|Young families|Small business owners|"
        "Student loan borrowers|Tax filers",
        "are urged to rebalance their 401(k) accounts|can cut costs with these budgeting tips|"
        "face new rules on interest and fees|should check these deductions before April|"
        "are turning to high-yield savings accounts|get relief under a new repayment plan",
        "Financial planners suggest building an emergency fund first.|Paying down high-interest "
        "debt saves the most money.|Experts recommend reviewing your budget every month.",
    ),
    ("news", "politics"): (
        "Senate Democrats|House Republicans|White House officials|State lawmakers|"
        "Presidential candidates|Swing-state governors",
        "unveil a new health care bill|clash over the federal budget deadline|"
        "push for a vote on election security|face backlash over redistricting plan|"
        "campaign hard ahead of the Iowa caucuses|reach a deal on infrastructure spending",
        "The bill faces a tough path in the divided Congress.|Polls show voters are split along "
        "party lines.|Lawmakers return to the capitol after the recess.",
    ),
    ("news", "crime"): (
        "Police detectives|Federal prosecutors|Sheriff's deputies|State investigators|FBI agents|"
        "Local officers",
        "arrest man in string of burglaries|charge driver in fatal hit-and-run|"
        "release surveillance video of robbery suspect|seek witnesses to downtown shooting|"
        "search for missing woman near the river|seize drugs and weapons in overnight raid",
        "The suspect is being held without bail.|Anyone with information is asked to call the "
        "tip line.|Court records show the case goes back several months.",
    ),
    ("news", "education"): (
        "School board members|Public school teachers|University leaders|Parents and students|"
        "State education officials|College admissions officers",
        "debate later start times for high schools|push back on new standardized testing rules|"
        "announce free tuition for low-income students|rally for smaller class sizes|"
        "approve a new reading curriculum|weigh changes to the school calendar",
        "The district serves more than 40,000 students.|Teachers say classrooms remain "
        "overcrowded.|The plan would take effect next fall semester.",
    ),
    ("health", "nutrition"): (
        "Dietitians|Nutrition researchers|Heart doctors|Food scientists|Registered nutritionists|"
        "Health experts",
        "say this breakfast habit lowers cholesterol|rank the best high-fiber foods for digestion|"
        "warn about hidden sugar in protein bars|explain how much protein you really need|"
        "recommend leafy greens for better sleep|compare plant-based diets with keto",
        "Whole grains, beans and vegetables topped the list.|Cutting added sugar had the biggest "
        "effect on blood pressure.|The study followed 10,000 adults for eight years.",
    ),
    ("health", "fitness"): (
        "Personal trainers|Marathon runners|Yoga instructors|Physical therapists|Fitness coaches|"
        "Strength athletes",
        "share a 20-minute workout to build core strength|reveal stretching mistakes that cause "
        "injuries|explain how to start running after 40|swear by this kettlebell routine|"
        "recommend rest days for faster muscle recovery|break down the perfect squat form",
        "Warm up for ten minutes before any intense session.|Consistency matters more than the "
        "length of each workout.|Start with light weights and add resistance slowly.",
    ),
    ("health", "medicine"): (
        "Hospital doctors|Cancer researchers|Public health officials|Pharmacists|"
        "Vaccine scientists|Emergency room nurses",
        "report promising results from a new drug trial|warn of an early flu season|"
        "urge patients to get screened for diabetes|track a rise in measles cases|"
        "test a gene therapy for a rare disease|explain new guidelines for blood pressure",
        "The clinical trial enrolled patients at twelve hospitals.|Symptoms include fever, cough "
        "and fatigue.|Doctors advise talking to your physician before changing medication.",
    ),
    ("foodanddrink", "recipes"): (
        "Home cooks|Celebrity chefs|Food bloggers|Baking experts|Test kitchen editors|"
        "Weeknight dinner fans",
        "share an easy one-pot chicken pasta|perfect a crispy sheet-pan salmon|"
        "bake a foolproof pumpkin pie|love this slow-cooker beef chili|"
        "make fluffy pancakes with three ingredients|roast vegetables with garlic and herbs",
        "Preheat the oven to 400 degrees and line the pan.|The dish is ready in under 30 minutes."
        "|Season with salt, pepper and fresh lemon juice.",
    ),
    ("foodanddrink", "restaurants"): (
        "Food critics|Local diners|Michelin inspectors|Pizza lovers|Burger fans|Brunch crowds",
        "rave about a new taco spot downtown|line up for the best barbecue in Texas|"
        "mourn the closing of a beloved diner|pick the top steakhouses in the city|"
        "flock to a rooftop restaurant with a view|review a new sushi bar's tasting menu",
        "Reservations are booked weeks in advance.|The menu changes with the seasons.|The chef "
        "trained in Paris and New York kitchens.",
    ),
    ("travel", "beaches"): (
        "Beach lovers|Island resorts|Caribbean travelers|Coastal towns|Snorkeling guides|Surfers",
        "rank the clearest turquoise water in Mexico|reopen after hurricane repairs|"
        "discover a hidden cove with white sand|offer cheap winter escapes to the Bahamas|"
        "warn swimmers about strong rip currents|celebrate the best sunset spots in Hawaii",
        "Pack sunscreen and reef-safe lotion.|The shoreline stretches for miles of soft sand.|"
        "Hotel rates drop sharply after the holidays.",
    ),
    ("travel", "nationalparks"): (
        "Park rangers|Hikers|Campers|Wildlife photographers|Yellowstone visitors|Rock climbers",
        "explore a scenic trail in Yosemite|spot grizzly bears near the river|"
        "face new permit rules at Zion|camp under dark skies in Utah|"
        "hike to a waterfall in the Great Smoky Mountains|warn of wildfire closures in the "
        "backcountry",
        "Bring plenty of water and check trail conditions.|The canyon views are best at sunrise."
        "|Campgrounds fill up quickly in the summer.",
    ),
    ("travel", "airlines"): (
        "Airline passengers|Flight attendants|Budget carriers|Airport officials|Frequent flyers|"
        "Pilots",
        "face long delays during the holiday travel rush|get new rules on carry-on bags|"
        "see cheaper fares on transatlantic routes|deal with canceled flights after the storm|"
        "earn double miles with a new rewards program|prepare for record Thanksgiving crowds",
        "TSA expects more than two million travelers a day.|Check your gate before heading to "
        "the airport.|Several carriers added nonstop routes to Europe.",
    ),
    ("autos", "electriccars"): (
        "Tesla owners|Electric SUV makers|Battery engineers|EV buyers|"
        "Charging network operators|Hybrid car drivers",
        "test a new model with 400 miles of range|wait for faster home charging stations|"
        "get a federal tax credit on new purchases|compare the best electric pickups|"
        "reveal a cheaper compact electric sedan|see battery prices fall again",
        "The vehicle charges to 80 percent in about 30 minutes.|Range drops noticeably in cold "
        "weather.|Automakers plan to launch dozens of battery models.",
    ),
    ("autos", "trucks"): (
        "Pickup truck buyers|Ford engineers|Heavy-duty truck owners|Off-road fans|Chevy dealers|"
        "Towing experts",
        "compare the best full-size pickups for towing|test a rugged new off-road trim|"
        "recall thousands of trucks over a brake issue|get a redesigned diesel engine|"
        "rank the most reliable midsize trucks|take a new crew cab through the mud",
        "The truck can tow up to 13,000 pounds.|The new cab offers more rear legroom.|Dealers "
        "report strong demand despite higher prices.",
    ),
    ("entertainment", "movies"): (
        "Marvel fans|Oscar voters|Hollywood studios|Box office analysts|Film critics|"
        "Indie directors",
        "line up for the superhero sequel premiere|praise the new sci-fi thriller|"
        "see record opening weekend ticket sales|debate the best picture frontrunners|"
        "reveal the first trailer for the holiday blockbuster|celebrate a surprise festival hit",
        "The film earned 90 million dollars in its opening weekend.|The cast includes several "
        "award-winning actors.|The director promised a darker tone for the sequel.",
    ),
    ("entertainment", "music"): (
        "Taylor Swift fans|Country singers|Reunited rock bands|Grammy nominees|Hip-hop artists|"
        "Concert promoters",
        "announce a world stadium tour|drop a surprise album at midnight|"
        "top the Billboard charts again|perform hit songs at the awards show|"
        "sell out arena concerts in minutes|release a new single and music video",
        "Tickets go on sale Friday morning.|The album features duets with several stars.|Fans "
        "sang along to every song of the encore.",
    ),
    ("entertainment", "television"): (
        "Netflix viewers|Reality show stars|Sitcom writers|Emmy-winning actors|"
        "Streaming executives|Late-night hosts",
        "binge the final season of the drama|react to a shocking finale twist|"
        "renew the comedy for another season|join the cast of a new crime series|"
        "reveal behind-the-scenes secrets of the show|announce a reboot of a classic series",
        "New episodes stream every Friday.|The season ends with a cliffhanger.|The cast reunited "
        "for a special episode.",
    ),
    ("weather", "storms"): (
        "Meteorologists|Storm chasers|Coastal residents|Emergency managers|Forecasters|"
        "Utility crews",
        "track a powerful hurricane toward the Gulf Coast|warn of tornadoes and hail across the "
        "Plains|prepare for heavy snow and blizzard conditions|restore power after severe "
        "thunderstorms|issue flash flood warnings for the weekend|brace for damaging winds "
        "overnight",
        "The National Weather Service issued a watch for several counties.|Up to a foot of snow "
        "could fall in the mountains.|Residents should stock up on water and batteries.",
    ),
    ("weather", "climate"): (
        "Climate scientists|Glacier researchers|Environmental groups|Ocean scientists|"
        "United Nations experts|Drought-stricken farmers",
        "report record warm temperatures this year|measure rapid ice melt in Greenland|"
        "warn of rising sea levels along the coast|track longer droughts in the West|"
        "study coral reef bleaching|call for deep cuts in carbon emissions",
        "Global average temperatures keep climbing.|The report cites data from satellites and "
        "ocean buoys.|Warmer oceans fuel stronger storms and heavier rain.",
    ),
    ("lifestyle", "parenting"): (
        "New parents|Pediatricians|Working moms|Stay-at-home dads|Child psychologists|"
        "Parents of teenagers",
        "share tips for better toddler sleep|talk about screen time limits for kids|"
        "handle picky eaters at dinner|plan a stress-free family vacation|"
        "explain how to talk to kids about bullying|balance homework and after-school activities",
        "Routines help children feel secure.|Experts recommend an hour of play outside every "
        "day.|Patience and consistency matter most.",
    ),
    ("lifestyle", "pets"): (
        "Dog owners|Cat lovers|Veterinarians|Animal shelter volunteers|Puppy trainers|"
        "Rescue groups",
        "find homes for dozens of abandoned kittens|share tricks for house-training a puppy|"
        "warn about toxic foods for dogs|celebrate a heartwarming rescue|"
        "explain why cats knock things off tables|meet the winner of the pet costume contest",
        "Adoption fees are waived this weekend.|Regular walks keep dogs healthy and calm.|The "
        "shelter needs blankets and pet food donations.",
    ),
    ("lifestyle", "gardening"): (
        "Home gardeners|Landscape designers|Master gardeners|Houseplant lovers|Backyard farmers|"
        "Flower growers",
        "plant tulip bulbs before the first frost|grow tomatoes in small containers|"
        "revive a dying fiddle leaf fig|build raised beds for vegetables|"
        "attract butterflies with native flowers|prune roses for spring blooms",
        "Water deeply once a week rather than a little every day.|Compost adds nutrients to "
        "tired soil.|Most herbs need six hours of sunlight.",
    ),
    ("technology", "space"): (
        "NASA engineers|SpaceX rocket teams|Astronomers|Astronauts|Mars rover scientists|"
        "Telescope teams",
        "launch a new satellite into orbit|spot a distant galaxy with the new telescope|"
        "prepare for the next moon landing|find signs of water on Mars|"
        "complete a spacewalk outside the station|detect a mysterious radio signal from deep space",
        "The launch window opens early Tuesday morning.|The mission will take about seven "
        "months.|Images show craters and ancient river beds.",
    ),
    ("technology", "gadgets"): (
        "iPhone users|Smartwatch makers|Laptop reviewers|Headphone testers|Samsung engineers|"
        "Smart home fans",
        "test the new foldable phone's battery|compare the best noise-canceling headphones|"
        "get a major update with new features|find the fastest laptops for the price|"
        "unbox the latest smart speaker|rank the best phone cameras this year",
        "The device goes on sale next month for 999 dollars.|Battery life lasted nearly two days "
        "in our tests.|The screen is brighter and sharper than last year.",
    ),
    ("technology", "software"): (
        "Microsoft developers|Google engineers|Cybersecurity experts|App makers|"
        "Open source programmers|Cloud providers",
        "patch a critical security flaw|release a major operating system update|"
        "warn of a new ransomware attack|launch an AI coding assistant|"
        "fix a bug that crashed millions of apps|expand data centers to meet demand",
        "Users should install the update right away.|The vulnerability affects older versions "
        "of the browser.|The company says no customer data was exposed.",
    ),
}
TITLE_FILLER = (
    "|||| this week| on Monday| on Friday| again| in Chicago| in Seattle| in Atlanta| in Denver|"
    " in Boston| in Phoenix"
)
ABSTRACT_FILLER = (
    "Here is what you need to know.|Read on for the full story.|More updates are expected in "
    "the coming days.|The news quickly drew attention online.|Experts weighed in on Tuesday.|"
    "It is the latest twist in a busy season."
)
TIER_TEXT: dict[int, tuple[str, str]] = {  # tier: title prefixes, closing abstract sentences
    -1: (
        "Rumor: |Unverified: |Viral: |Gossip: ",
        " The claim comes from an anonymous social media post and could not be verified.|"
        " Details remain unconfirmed and may change.",
    ),
    0: ("", ""),
    1: (
        "Analysis: |Exclusive: |In depth: |Explainer: ",
        " Our reporters verified every figure with official records and independent experts.|"
        " This in-depth report draws on documents, data and on-the-record interviews.",
    ),
}


@dataclass(frozen=True)
class ClickModel:
    """Weights of the click model described in the module docstring."""

    interest: float = 3.5  # candidate in one of the user's interest subcategories
    category: float = 0.6  # same category as an interest, other subcategory
    quality: float = 1.0  # times the quality tier (-1, 0, +1)
    style: float = 2.0  # image in the user's preferred visual style
    age_per_day: float = 0.3  # hidden recency penalty per day since publication
    style_users: float = 0.5  # share of users with a preferred visual style
    interest_draws: float = 0.15  # share of candidate draws from the user's interests
    clicks: tuple[float, float, float] = (0.6, 0.25, 0.15)  # P(1, 2, 3 clicks)


@dataclass(frozen=True)
class SynthConfig:
    """Size and seed of a synthetic data set; the defaults suit the demo."""

    news: int = 3000
    users: int = 2500
    impressions: int = 15000
    seed: int = 0
    dev_share: float = 0.2
    image_share: float = 0.5
    image_size: int = 128
    model: ClickModel = field(default_factory=ClickModel)

    def __post_init__(self) -> None:
        if self.news < 200 or self.users < 1 or self.impressions < 10:
            raise ValueError("synthetic data needs news >= 200, users >= 1, impressions >= 10")
        if not (0 < self.dev_share < 1 and 0 <= self.image_share <= 1):
            raise ValueError("dev_share must lie in (0, 1) and image_share in [0, 1]")
        if not 32 <= self.image_size <= 512:
            raise ValueError("image_size must lie in [32, 512]")

    @classmethod
    def quick(cls, seed: int = 0) -> SynthConfig:
        """A small data set for tests and quick runs."""
        return cls(news=500, users=300, impressions=2000, seed=seed)


@dataclass(frozen=True)
class SynthSummary:
    """Counts and oracle figures of a generated data set."""

    path: str
    news: int
    images: int
    categories: int
    subcategories: int
    users: int  # users with at least one impression
    train_impressions: int
    dev_impressions: int
    candidates: int
    clicks: int
    oracle_auc: float  # dev AUC of the true click probabilities
    visible_auc: float  # dev AUC of the utility without the hidden age term
    text_only_auc: float  # ... without the age and the image-style terms
    seconds: float = 0.0

    def __str__(self) -> str:
        return "\n".join(
            [
                f"synthetic MIND data in {self.path}",
                f"  news {self.news:,} ({self.images:,} with images), categories "
                f"{self.categories}, subcategories {self.subcategories}",
                f"  users {self.users:,}, impressions train {self.train_impressions:,} / dev "
                f"{self.dev_impressions:,}, candidates {self.candidates:,}, clicks {self.clicks:,}",
                f"  dev oracle AUC {self.oracle_auc:.4f} (visible signals only "
                f"{self.visible_auc:.4f}, without images {self.text_only_auc:.4f})",
                f"  generated in {self.seconds:.1f} s" if self.seconds else "  (already there)",
            ]
        )


@dataclass(frozen=True)
class _Topics:
    categories: list[str]
    subcategories: list[str]
    category_of: np.ndarray  # (S,) category of each subcategory
    rank_in_category: np.ndarray  # (S,) 0..3, picks the image shape
    subjects: list[list[str]]  # per subcategory
    predicates: list[list[str]]
    details: list[list[str]]


@dataclass(frozen=True)
class _News:
    sub: np.ndarray  # (N,) subcategory
    tier: np.ndarray  # (N,) quality tier -1, 0, +1
    style: np.ndarray  # (N,) -1 no image, 0 stripes, 1 smooth
    published: np.ndarray  # (N,) unix seconds
    archive: np.ndarray  # (N,) published before the candidate window of the first impression


@dataclass(frozen=True)
class _Users:
    interests: np.ndarray  # (U, 3) subcategories, -1 padded
    likes: np.ndarray  # (U, S) bool
    likes_category: np.ndarray  # (U, C) bool
    style: np.ndarray  # (U,) preferred style, -1 none


@dataclass(frozen=True)
class _Impressions:
    user: np.ndarray  # (I,)
    time: np.ndarray  # (I,) unix seconds; train rows first, then dev rows
    n_train: int
    offsets: np.ndarray  # (I+1,) CSR into items
    items: np.ndarray  # (M,) news rows
    labels: np.ndarray  # (M,) bool
    utility: np.ndarray  # (M,) z


@cache
def _topics() -> _Topics:
    keys = list(VOCABULARY)
    categories = sorted({c for c, _ in keys})
    category_of = np.array([categories.index(c) for c, _ in keys])
    rank = np.array([[c for c, _ in keys[:i]].count(c) for i, (c, _) in enumerate(keys)])
    parts = [[p.split("|") for p in VOCABULARY[k]] for k in keys]
    return _Topics(
        categories=categories,
        subcategories=[s for _, s in keys],
        category_of=category_of,
        rank_in_category=rank,
        subjects=[p[0] for p in parts],
        predicates=[p[1] for p in parts],
        details=[p[2] for p in parts],
    )


def _pick(rng: np.random.Generator, groups: list[list[str]], group: np.ndarray) -> list[str]:
    """One random string of groups[g] for each g in group."""
    flat = np.array([s for g in groups for s in g], dtype=object)
    counts = np.array([len(g) for g in groups])
    starts = np.cumsum(counts) - counts
    return flat[starts[group] + (rng.random(len(group)) * counts[group]).astype(np.int64)].tolist()


def _make_news(rng: np.random.Generator, config: SynthConfig, share: np.ndarray) -> _News:
    n = config.news
    live_from = START - WINDOW_DAYS * DAY
    end = START + (TRAIN_DAYS + DEV_DAYS) * DAY
    has_image = rng.random(n) < config.image_share
    archive = rng.random(n) < ARCHIVE_SHARE
    return _News(
        sub=rng.choice(len(share), n, p=share),
        tier=rng.choice(TIERS, n, p=TIER_SHARES),
        style=np.where(has_image, rng.integers(0, 2, n), -1),
        published=np.where(
            archive,
            rng.integers(live_from - ARCHIVE_DAYS * DAY, live_from, n),
            rng.integers(live_from, end, n),
        ),
        archive=archive,
    )


def _news_text(rng: np.random.Generator, news: _News, topics: _Topics) -> pl.DataFrame:
    """Title and abstract of every news item, from its subcategory's words and its tier."""
    tier = news.tier + 1
    prefixes = [TIER_TEXT[t][0].split("|") for t in TIERS]
    closings = [TIER_TEXT[t][1].split("|") for t in TIERS]
    frame = pl.DataFrame(
        {
            "prefix": _pick(rng, prefixes, tier),
            "subject": _pick(rng, topics.subjects, news.sub),
            "predicate": _pick(rng, topics.predicates, news.sub),
            "filler": _pick(rng, [TITLE_FILLER.split("|")], np.zeros_like(tier)),
            "detail": _pick(rng, topics.details, news.sub),
            "context": _pick(rng, [ABSTRACT_FILLER.split("|")], np.zeros_like(tier)),
            "closing": _pick(rng, closings, tier),
        },
        schema=dict.fromkeys(
            ["prefix", "subject", "predicate", "filler", "detail", "context", "closing"], pl.String
        ),
    )
    return frame.select(
        title=pl.concat_str("prefix", "subject", pl.lit(" "), "predicate", "filler"),
        abstract=pl.concat_str("detail", pl.lit(" "), "context", "closing"),
    )


def _make_users(
    rng: np.random.Generator, config: SynthConfig, topics: _Topics, share: np.ndarray
) -> _Users:
    n, n_sub = config.users, len(topics.subcategories)
    count = rng.choice([1, 2, 3], n, p=[0.3, 0.4, 0.3])
    ranked = np.argsort(-(np.log(share) + rng.gumbel(size=(n, n_sub))), axis=1)[:, :3]
    interests = np.where(np.arange(3) < count[:, None], ranked, -1)
    likes = np.zeros((n, n_sub), bool)
    rows, cols = np.nonzero(interests >= 0)
    likes[rows, interests[rows, cols]] = True
    category = np.eye(len(topics.categories), dtype=np.int64)[topics.category_of]  # (S, C)
    return _Users(
        interests=interests,
        likes=likes,
        likes_category=(likes @ category) > 0,
        style=np.where(rng.random(n) < config.model.style_users, rng.integers(0, 2, n), -1),
    )


def _utility(
    model: ClickModel,
    users: _Users,
    topics: _Topics,
    user: np.ndarray,
    sub: np.ndarray,
    tier: np.ndarray,
    style: np.ndarray,
    age_days: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Utility z of news with the given attributes for users (arrays broadcast together)."""
    own = users.likes[user, sub]
    near = users.likes_category[user, topics.category_of[sub]] & ~own
    styled = (style >= 0) & (style == users.style[user])
    return (
        model.interest * own
        + model.category * near
        + model.quality * tier
        + model.style * styled
        - model.age_per_day * age_days
    )


def _first_occurrences(group: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each (group, item) pair, in ascending order."""
    _, first = np.unique(group * (int(item.max()) + 1) + item, return_index=True)
    return np.sort(first)


def _draw_rows(rng: np.random.Generator, weight: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """draws[r] column indices from row r of weight (R, C), with probability proportional to it."""
    rows, cols = weight.shape
    cdf = np.cumsum(weight, axis=1)
    cdf /= cdf[:, -1:]
    row = np.repeat(np.arange(rows), draws)
    target = row + rng.random(len(row)) * (1 - 1e-9)  # stays inside the row's [r, r + 1)
    return (
        np.searchsorted((cdf + np.arange(rows)[:, None]).ravel(), target, side="right") - row * cols
    )


def _histories(
    rng: np.random.Generator, model: ClickModel, users: _Users, news: _News, topics: _Topics
) -> tuple[np.ndarray, np.ndarray]:
    """Clicked archive news per user (CSR offsets, news rows), drawn from the click model.

    Archive news fall into cells (subcategory, tier, style) of equal utility for a user, so each
    draw picks a cell by weight count * exp(z), then a news item inside the cell. The first
    `length` distinct items of such draws are a Plackett-Luce sample without replacement.
    """
    n_users = len(users.style)
    length = np.rint(rng.lognormal(np.log(HISTORY_MEDIAN), HISTORY_SIGMA, n_users))
    length = np.clip(length, 1, 50).astype(np.int64)
    length[rng.random(n_users) < EMPTY_HISTORIES] = 0
    archive = np.flatnonzero(news.archive)
    cell_of = (news.sub[archive] * 3 + news.tier[archive] + 1) * 3 + news.style[archive] + 1
    n_cells = len(topics.subcategories) * 9
    members = archive[np.argsort(cell_of, kind="stable")]
    counts = np.bincount(cell_of, minlength=n_cells)
    starts = np.cumsum(counts) - counts
    cells = np.arange(n_cells)
    owner, cell = [], []
    for a in range(0, n_users, CHUNK_USERS):
        user = np.arange(a, min(a + CHUNK_USERS, n_users))
        z = _utility(
            model, users, topics, user[:, None], cells // 9, cells // 3 % 3 - 1, cells % 3 - 1
        )
        draws = np.where(length[user] > 0, 4 * length[user] + 20, 0)  # spares for repeats
        owner.append(np.repeat(user, draws))
        cell.append(_draw_rows(rng, counts * np.exp(z - z.max(axis=1, keepdims=True)), draws))
    owner, cell = np.concatenate(owner), np.concatenate(cell)
    item = members[starts[cell] + (rng.random(len(owner)) * counts[cell]).astype(np.int64)]
    keep = _first_occurrences(owner, item)
    owner, item = owner[keep], item[keep]
    keep = np.arange(len(owner)) - csr_offsets(np.bincount(owner, minlength=n_users))[owner]
    owner, item = owner[keep < length[owner]], item[keep < length[owner]]
    order = np.lexsort((item, news.published[item], owner))
    return csr_offsets(np.bincount(owner, minlength=n_users)), item[order]


def _draw_candidates(
    rng: np.random.Generator,
    model: ClickModel,
    users: _Users,
    news: _News,
    user: np.ndarray,
    when: np.ndarray,
    size: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct recent news per impression (impression, news row), in random order."""
    n_draws = 2 * size + 10  # extra draws make up for repeats
    imp = np.repeat(np.arange(len(size)), n_draws)
    t, u = when[imp], user[imp]
    window = WINDOW_DAYS * DAY
    live = np.flatnonzero(~news.archive)
    by_time = live[np.argsort(news.published[live], kind="stable")]
    lo = np.searchsorted(news.published[by_time], t - window, side="left")
    hi = np.searchsorted(news.published[by_time], t, side="right")
    if (hi <= lo).any():
        raise ValueError("too few news for the candidate window; increase the number of news")
    pick = by_time[lo + (rng.random(len(imp)) * (hi - lo)).astype(np.int64)]
    span = int(news.published.max()) + window + 1  # sort key: subcategory, then time
    by_sub = live[np.lexsort((news.published[live], news.sub[live]))]
    keys = news.sub[by_sub] * span + news.published[by_sub]
    n_interests = (users.interests >= 0).sum(axis=1)
    sub = users.interests[u, (rng.random(len(imp)) * n_interests[u]).astype(np.int64)]
    lo = np.searchsorted(keys, sub * span + t - window, side="left")
    hi = np.searchsorted(keys, sub * span + t, side="right")
    offset = np.minimum(lo + (rng.random(len(imp)) * (hi - lo)).astype(np.int64), len(keys) - 1)
    wanted = (rng.random(len(imp)) < model.interest_draws) & (hi > lo)
    pick = np.where(wanted, by_sub[offset], pick)
    keep = _first_occurrences(imp, pick)
    imp, pick = imp[keep], pick[keep]
    rank = np.arange(len(imp)) - csr_offsets(np.bincount(imp, minlength=len(size)))[imp]
    keep = rank < size[imp]
    return imp[keep], pick[keep]


def _make_impressions(
    rng: np.random.Generator, config: SynthConfig, users: _Users, news: _News, topics: _Topics
) -> _Impressions:
    model, n = config.model, config.impressions
    n_dev = max(1, round(n * config.dev_share))
    activity = rng.lognormal(0.0, 1.0, config.users)
    user = rng.choice(config.users, n, p=activity / activity.sum())
    dev_start = START + TRAIN_DAYS * DAY
    when = np.concatenate(
        [
            np.sort(rng.integers(START, dev_start, n - n_dev)),
            np.sort(rng.integers(dev_start, dev_start + DEV_DAYS * DAY, n_dev)),
        ]
    )
    size = rng.integers(5, 51, n)
    imp, items = [], []
    for a in range(0, n, CHUNK_IMPRESSIONS):
        part = slice(a, a + CHUNK_IMPRESSIONS)
        drawn = _draw_candidates(rng, model, users, news, user[part], when[part], size[part])
        imp.append(drawn[0] + a)
        items.append(drawn[1])
    imp, items = np.concatenate(imp), np.concatenate(items)
    offsets = csr_offsets(np.bincount(imp, minlength=n))
    if np.diff(offsets).min() < 5:
        raise ValueError("too few news for 5 candidates per impression; increase the news")
    age = (when[imp] - news.published[items]) / DAY
    z = _utility(
        model, users, topics, user[imp], news.sub[items], news.tier[items], news.style[items], age
    )
    clicks = rng.choice([1, 2, 3], n, p=model.clicks)
    key = z + rng.gumbel(size=len(z))  # the m largest keys: m Plackett-Luce draws
    dense, _ = _pad(key, offsets, -np.inf)
    kth = -np.sort(-dense, axis=1)[np.arange(n), clicks - 1]  # (I,) m-th largest key
    return _Impressions(
        user=user,
        time=when,
        n_train=n - n_dev,
        offsets=offsets,
        items=items,
        labels=key >= kth[imp],
        utility=z,
    )


def _pad(values: np.ndarray, offsets: np.ndarray, fill: float) -> tuple[np.ndarray, tuple]:
    """Ragged rows (CSR) as a dense (rows, longest) matrix, and the (row, col) of each value."""
    sizes = np.diff(offsets)
    row = np.repeat(np.arange(len(sizes)), sizes)
    col = np.arange(len(values)) - (offsets[:-1] - offsets[0])[row]
    dense = np.full((len(sizes), sizes.max()), fill)
    dense[row, col] = values
    return dense, (row, col)


def _inclusion(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(item among the first 1, 2, 3 Plackett-Luce draws) for weights w (B, K), 0 = padding."""
    total = w.sum(axis=1, keepdims=True)
    first = w / total
    b = w / (total * (total - w))  # (B, K) P(j first) / weight left after j
    second = w * (b.sum(axis=1, keepdims=True) - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = b[:, :, None] * w[:, None, :] / (total[:, :, None] - w[:, :, None] - w[:, None, :])
    diagonal = np.arange(w.shape[1])
    a[:, diagonal, diagonal] = 0.0  # a[j, k]: P(j first, k second) / weight left after both
    third = w * (a.sum(axis=(1, 2))[:, None] - a.sum(axis=2) - a.sum(axis=1))
    return first, first + second, first + second + third


def click_probability(
    utility: np.ndarray,
    offsets: np.ndarray,
    clicks: tuple[float, float, float] = ClickModel.clicks,
    chunk: int = 1024,
) -> np.ndarray:
    """Exact P(clicked) per candidate when m ~ clicks (1-3) are drawn by Plackett-Luce on exp(z).

    Needs at least 4 candidates per impression; vectorised over chunks of impressions.
    """
    out = np.empty(len(utility))
    for a in range(0, len(offsets) - 1, chunk):
        part = offsets[a : a + chunk + 1]
        z, (row, col) = _pad(utility[part[0] : part[-1]], part, -np.inf)
        w = np.exp(z - z.max(axis=1, keepdims=True))
        probability = sum(p * m for p, m in zip(clicks, _inclusion(w), strict=True))
        out[part[0] : part[-1]] = probability[row, col]
    return out


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
    """(n,) hue, saturation, value in [0, 1] -> (n, 3) RGB in [0, 1]."""
    h, s, v = np.broadcast_arrays(np.asarray(h) % 1.0, s, v)
    sector = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    channels = ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))
    return np.stack([np.choose(sector, c) for c in channels], axis=-1)


def _image_params(rng: np.random.Generator, sub: np.ndarray, style: np.ndarray) -> dict:
    """Per-image drawing parameters: topic colours and shape, style, and random layout."""
    topics, n = _topics(), len(sub)
    rank = topics.rank_in_category[sub]
    hue = topics.category_of[sub] / len(topics.categories) + 0.025 * (rank - 1.5)
    hue = hue + rng.uniform(-0.015, 0.015, n)
    value = rng.uniform(0.8, 1.0, n)
    return {
        "light": _hsv_to_rgb(hue, 0.3, value),
        "dark": _hsv_to_rgb(hue, 0.75, 0.55 * value),
        "ink": _hsv_to_rgb(hue, 1.0, 0.3),
        "shape": rank,
        "style": style,
        "period": rng.uniform(0.06, 0.12, n),  # stripe period, share of the image side
        "angle": rng.uniform(0, np.pi, n),
        "phase": rng.uniform(0, 2 * np.pi, n),
        "cx": rng.uniform(0.35, 0.65, n),
        "cy": rng.uniform(0.35, 0.65, n),
        "radius": rng.uniform(0.2, 0.32, n),
    }


def _shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inside of a circle, square, triangle or diamond of radius r around (0, 0)."""
    if shape == 0:
        return dx**2 + dy**2 < r**2
    if shape == 1:
        return np.maximum(abs(dx), abs(dy)) < 0.8 * r
    if shape == 2:
        return (dy < 0.7 * r) & (abs(dx) < 0.6 * (dy + r))
    return abs(dx) + abs(dy) < r


def _render(params: dict, size: int) -> np.ndarray:
    """Draw images (B, size, size, 3) uint8: a background (stripes or smooth) and one shape."""
    col = {k: v.astype(np.float32).reshape(len(v), -1, 1, 1) for k, v in params.items()}
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    along = (x - 0.5) * np.cos(col["angle"]) + (y - 0.5) * np.sin(col["angle"])  # (B, 1, P, P)
    stripes = np.sin(2 * np.pi * along / col["period"] + col["phase"]) > 0
    mix = np.where(col["style"] == 0, stripes, np.clip(0.5 + 0.7 * along, 0, 1))
    light, dark = col["light"], col["dark"]  # (B, 3, 1, 1)
    image = light + mix * (dark - light)  # (B, 3, P, P)
    for shape in range(4):
        b = np.flatnonzero(params["shape"] == shape)
        c = {k: col[k][b] for k in ("cx", "cy", "radius")}
        inside = _shape_mask(shape, x - c["cx"], y - c["cy"], c["radius"])
        image[b] = np.where(inside, col["ink"][b], image[b])
    return np.ascontiguousarray((image * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1))


def _write_images(
    folder: Path, rng: np.random.Generator, news: _News, size: int, chunk: int = 128
) -> int:
    """Write images/<news_id>.jpg for the news with an image; return how many."""
    rows = np.flatnonzero(news.style >= 0)
    params = _image_params(rng, news.sub[rows], news.style[rows])
    folder.mkdir()
    with tqdm(total=len(rows), desc="images", unit="img", disable=None) as bar:
        for a in range(0, len(rows), chunk):
            batch = _render({k: v[a : a + chunk] for k, v in params.items()}, size)
            for row, pixels in zip(rows[a : a + chunk], batch, strict=True):
                Image.fromarray(pixels).save(folder / f"N{row + 1}.jpg", "JPEG", quality=90)
            bar.update(len(batch))
    return len(rows)


def _write_tsv(frame: pl.DataFrame, path: Path, header: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_csv(
        path, separator="\t", include_header=header, quote_style="never", float_precision=8
    )


def _news_frame(news: _News, text: pl.DataFrame, topics: _Topics) -> pl.DataFrame:
    ids = "N" + pl.Series("news_id", np.arange(1, len(news.sub) + 1)).cast(pl.String)
    return pl.DataFrame(
        {
            "news_id": ids,
            "category": np.array(topics.categories)[topics.category_of[news.sub]],
            "subcategory": np.array(topics.subcategories)[news.sub],
            "title": text["title"],
            "abstract": text["abstract"],
            "url": "https://news.example/" + ids + ".html",
            "title_entities": "[]",
            "abstract_entities": "[]",
        }
    )


def _joined(group: np.ndarray, n: int, tokens: pl.Expr, frame: dict) -> pl.Series:
    """One space-joined string of tokens per group 0..n-1 ("" for an empty group)."""
    parts = pl.DataFrame({"group": group, **frame}).group_by("group", maintain_order=True)
    joined = parts.agg(tokens.str.join(" ").alias("text"))
    every = pl.DataFrame({"group": np.arange(n, dtype=group.dtype)})
    return every.join(joined, on="group", how="left", maintain_order="left")["text"].fill_null("")


def _history_strings(histories: tuple[np.ndarray, np.ndarray]) -> pl.Series:
    """The MIND history field of every user."""
    offsets, items = histories
    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return _joined(owner, len(offsets) - 1, pl.format("N{}", "item"), {"item": items + 1})


def _behaviors_frame(imps: _Impressions, history: pl.Series, first: int, last: int) -> pl.DataFrame:
    """Raw MIND behaviors of impressions first..last-1 (one split), ids numbered from 1."""
    bounds = imps.offsets[first : last + 1]
    lo, hi = bounds[0], bounds[-1]
    shown = _joined(
        np.repeat(np.arange(last - first), np.diff(bounds)),
        last - first,
        pl.format("N{}-{}", "item", "label"),
        {"item": imps.items[lo:hi] + 1, "label": imps.labels[lo:hi].astype(np.int8)},
    )
    user = imps.user[first:last]
    return pl.DataFrame(
        {
            "impression_id": np.arange(1, last - first + 1),
            "user_id": "U" + pl.Series(user + 1).cast(pl.String),
            "time": pl.from_epoch(pl.Series(imps.time[first:last]), time_unit="s").dt.strftime(
                "%-m/%-d/%Y %-I:%M:%S %p"
            ),
            "history": history.gather(user),
            "impressions": shown,
        }
    )


def _dev_figures(
    imps: _Impressions, users: _Users, news: _News, model: ClickModel
) -> tuple[pl.DataFrame, dict[str, float]]:
    """The dev oracle table and the dev AUC of the oracle, of visible signals, of text only."""
    lo = imps.offsets[imps.n_train]
    offsets = imps.offsets[imps.n_train :] - lo
    items, labels, z = imps.items[lo:], imps.labels[lo:], imps.utility[lo:]
    user = np.repeat(imps.user[imps.n_train :], np.diff(offsets))
    sub, tier, style = news.sub[items], news.tier[items], news.style[items]
    visible = _utility(model, users, _topics(), user, sub, tier, style)  # no age term
    text_only = _utility(model, users, _topics(), user, sub, tier, np.full_like(style, -1))
    probability = click_probability(z, offsets, model.clicks)
    oracle = pl.DataFrame(
        {
            "impression_id": np.repeat(np.arange(1, len(offsets)), np.diff(offsets)),
            "news_id": "N" + pl.Series(items + 1).cast(pl.String),
            "probability": probability,
        }
    )
    figures = {
        name: evaluate_scores(scores, labels, offsets)["auc"]
        for name, scores in [
            ("oracle_auc", probability),
            ("visible_auc", visible),
            ("text_only_auc", text_only),
        ]
    }
    return oracle, figures


def _truth(news: _News, users: _Users, topics: _Topics) -> dict[str, pl.DataFrame]:
    """Hidden attributes of news and users (style: -1 none, 0 stripes, 1 smooth)."""
    names = np.append(np.array(topics.subcategories, dtype=object), "")  # -1 -> ""
    interests = pl.DataFrame(names[users.interests], schema=["a", "b", "c"], orient="row")
    return {
        "news": pl.DataFrame(
            {
                "news_id": "N" + pl.Series(np.arange(1, len(news.sub) + 1)).cast(pl.String),
                "tier": news.tier,
                "style": news.style,
                "published": news.published,
            }
        ),
        "users": pl.DataFrame(
            {
                "user_id": "U" + pl.Series(np.arange(1, len(users.style) + 1)).cast(pl.String),
                "interests": interests.select(
                    pl.concat_list("a", "b", "c")
                    .list.eval(pl.element().filter(pl.element() != ""))
                    .list.join(",")
                ).to_series(),
                "style": users.style,
            }
        ),
    }


def _write(folder: Path, config: SynthConfig) -> dict:
    """Simulate and write everything into folder; return the summary fields."""
    topics, model = _topics(), config.model
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(6)]
    share = rngs[0].dirichlet(np.full(len(topics.subcategories), 8.0))
    news = _make_news(rngs[0], config, share)
    users = _make_users(rngs[2], config, topics, share)
    histories = _histories(rngs[3], model, users, news, topics)
    imps = _make_impressions(rngs[4], config, users, news, topics)
    news_frame = _news_frame(news, _news_text(rngs[1], news, topics), topics)
    history = _history_strings(histories)
    bounds = {"train": (0, imps.n_train), "dev": (imps.n_train, config.impressions)}
    for split, (first, last) in bounds.items():
        _write_tsv(news_frame, folder / split / "news.tsv")
        _write_tsv(_behaviors_frame(imps, history, first, last), folder / split / "behaviors.tsv")
    oracle, figures = _dev_figures(imps, users, news, model)
    _write_tsv(oracle, folder / "dev" / "oracle.tsv", header=True)
    for name, frame in _truth(news, users, topics).items():
        _write_tsv(frame, folder / "truth" / f"{name}.tsv", header=True)
    started = time.perf_counter()
    images = _write_images(folder / "images", rngs[5], news, config.image_size)
    logger.info("wrote %d images in %.1f s", images, time.perf_counter() - started)
    return {
        "news": config.news,
        "images": images,
        "categories": len(np.unique(topics.category_of[news.sub])),
        "subcategories": len(np.unique(news.sub)),
        "users": len(np.unique(imps.user)),
        "train_impressions": imps.n_train,
        "dev_impressions": config.impressions - imps.n_train,
        "candidates": len(imps.items),
        "clicks": int(imps.labels.sum()),
        **{k: round(v, 6) for k, v in figures.items()},
    }


def _config_json(config: SynthConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def _saved_manifest(out: Path) -> dict | None:
    """The manifest of the synthetic data set in out, None if out is empty or missing.

    Raises FileExistsError when out holds anything else (a store, real data, ...).
    """
    path = out / "manifest.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("kind") == MANIFEST_KIND:
        return saved
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no synthetic data set")
    return None


def generate(out: Path | str, config: SynthConfig | None = None) -> SynthSummary:
    """Write a synthetic MIND-format data set to out (layout and model: see the module doc).

    A data set already in out made with the same configuration is reused; one made with another
    configuration is replaced; any other non-empty folder is an error. Written to a temporary
    folder and renamed, so an interrupted run leaves no half data set.
    """
    config = config or SynthConfig()
    out = Path(out)
    saved = _saved_manifest(out)
    if saved and saved["version"] == FORMAT_VERSION and saved["config"] == _config_json(config):
        logger.info("synthetic data in %s is up to date", out)
        return SynthSummary(path=str(out), **saved["summary"])
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        fields = _write(tmp, config)
        saved = {
            "kind": MANIFEST_KIND,
            "version": FORMAT_VERSION,
            "config": _config_json(config),
            "summary": fields,
        }
        (tmp / "manifest.json").write_text(json.dumps(saved, indent=2) + "\n")
    return SynthSummary(path=str(out), seconds=time.perf_counter() - started, **fields)
