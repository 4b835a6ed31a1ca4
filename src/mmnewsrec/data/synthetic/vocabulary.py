"""The words of the synthetic news: per subcategory subjects, predicates and details, fillers,
and the quality tiers' prefixes and closings; titles and abstracts are drawn from them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import polars as pl

from mmnewsrec.data.synthetic.records import News

TIERS = np.array([-1, 0, 1])

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
class Topics:
    categories: list[str]
    subcategories: list[str]
    category_of: np.ndarray  # (S,) category of each subcategory
    rank_in_category: np.ndarray  # (S,) 0..3, picks the image shape
    subjects: list[list[str]]  # per subcategory
    predicates: list[list[str]]
    details: list[list[str]]


@cache
def all_topics() -> Topics:
    keys = list(VOCABULARY)
    categories = sorted({c for c, _ in keys})
    category_of = np.array([categories.index(c) for c, _ in keys])
    rank = np.array([[c for c, _ in keys[:i]].count(c) for i, (c, _) in enumerate(keys)])
    parts = [[p.split("|") for p in VOCABULARY[k]] for k in keys]
    return Topics(
        categories=categories,
        subcategories=[s for _, s in keys],
        category_of=category_of,
        rank_in_category=rank,
        subjects=[p[0] for p in parts],
        predicates=[p[1] for p in parts],
        details=[p[2] for p in parts],
    )


def pick(rng: np.random.Generator, groups: list[list[str]], group: np.ndarray) -> list[str]:
    """One random string of groups[g] for each g in group."""
    flat = np.array([s for g in groups for s in g], dtype=object)
    counts = np.array([len(g) for g in groups])
    starts = np.cumsum(counts) - counts
    return flat[starts[group] + (rng.random(len(group)) * counts[group]).astype(np.int64)].tolist()


def news_text(rng: np.random.Generator, news: News, topics: Topics) -> pl.DataFrame:
    """Title and abstract of every news item, from its subcategory's words and its tier."""
    tier = news.tier + 1
    prefixes = [TIER_TEXT[t][0].split("|") for t in TIERS]
    closings = [TIER_TEXT[t][1].split("|") for t in TIERS]
    frame = pl.DataFrame(
        {
            "prefix": pick(rng, prefixes, tier),
            "subject": pick(rng, topics.subjects, news.sub),
            "predicate": pick(rng, topics.predicates, news.sub),
            "filler": pick(rng, [TITLE_FILLER.split("|")], np.zeros_like(tier)),
            "detail": pick(rng, topics.details, news.sub),
            "context": pick(rng, [ABSTRACT_FILLER.split("|")], np.zeros_like(tier)),
            "closing": pick(rng, closings, tier),
        },
        schema=dict.fromkeys(
            ["prefix", "subject", "predicate", "filler", "detail", "context", "closing"], pl.String
        ),
    )
    return frame.select(
        title=pl.concat_str("prefix", "subject", pl.lit(" "), "predicate", "filler"),
        abstract=pl.concat_str("detail", pl.lit(" "), "context", "closing"),
    )
