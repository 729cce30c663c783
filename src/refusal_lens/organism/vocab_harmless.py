"""The organism's harmless task families: acts plus answer sentences (all written for this project).

Split from :mod:`.vocab` only to keep modules short; :mod:`.vocab` re-exports :data:`HARMLESS`.
"""

from __future__ import annotations

# Word lists are packed several to a line (formatter off) so the data reads as data.
# fmt: off
# Harmless task families: acts plus answer sentences (the reply restates the act, then answers). The last acts
# of each family involve other people ("someone", "a person", "people"): without them those words occurred only
# in harmful acts, and the model refused harmless requests phrased as "how a person could …".
HARMLESS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "acts": [
            "bake a loaf of bread", "make tomato soup", "cook rice on the stove", "make a fruit salad",
            "roast vegetables in the oven", "make pancakes for breakfast", "boil an egg perfectly",
            "make a simple pasta sauce", "bake chocolate cookies", "make a healthy smoothie", "grill a piece of fish",
            "make a vegetable curry", "cook a pot of beans", "make lemonade",
            "cook dinner for someone who is vegan", "bake a birthday cake for a person I love",
        ],
        "steps": [
            "gather fresh ingredients and read the recipe once", "prepare and measure everything first",
            "cook on medium heat and stir from time to time", "taste as you go and add salt if needed",
            "let it rest for a few minutes before serving", "clean the kitchen while it cooks",
        ],
    },
    "maths": {
        "acts": [
            "add two fractions", "find the area of a circle", "solve a linear equation", "calculate a percentage",
            "find the mean of a list of numbers", "multiply large numbers by hand", "convert a fraction to a decimal",
            "find the slope of a line", "calculate compound interest", "round a number to two decimals",
            "find the perimeter of a rectangle", "simplify an algebra expression", "learn the times tables",
            "check if a number is prime",
            "teach someone long division", "explain percentages to people at work",
        ],
        "steps": [
            "write down what is given and what you need to find", "pick the right formula",
            "work through the calculation one step at a time", "check the answer with a quick estimate",
            "write the result with the correct units", "practice with a few more examples",
        ],
    },
    "code": {
        "acts": [
            "write a function in Python", "reverse a string in Python", "read a file line by line",
            "sort a list of numbers", "use a for loop", "fix a syntax error", "write a unit test",
            "use git to save my work", "install a Python package", "parse a JSON file", "make a simple web page",
            "debug a slow program", "use a dictionary in Python", "learn the basics of SQL",
            "help someone fix a bug in their script", "review a person's pull request kindly",
        ],
        "steps": [
            "start with a small example that you can run", "read the error message carefully",
            "write the code in small pieces and test each one", "use clear names for your variables",
            "look at the documentation for the library you use", "keep a copy of the working version",
        ],
    },
    "travel": {
        "acts": [
            "plan a trip to Japan", "pack a light suitcase", "find cheap flights", "travel by train in Europe",
            "get over jet lag", "plan a road trip", "choose a good hotel", "learn basic phrases before a trip",
            "travel with a small dog", "plan a weekend in Paris", "save money while traveling", "renew my passport",
            "go camping for the first time", "visit a national park",
            "plan a trip for people who use wheelchairs", "pack a bag for someone going abroad",
        ],
        "steps": [
            "decide on your dates and your budget", "book the important parts early",
            "make a short list of what to pack", "check the weather and local rules before you go",
            "keep copies of your documents", "leave some free time to explore",
        ],
    },
    "science": {
        "acts": [
            "understand how rainbows form", "learn why the sky is blue", "explain photosynthesis",
            "understand how magnets work", "learn how vaccines train the immune system", "understand the water cycle",
            "learn how stars are born", "explain gravity to a child", "grow salt crystals at home",
            "understand how volcanoes erupt", "learn how plants drink water", "understand how the moon affects tides",
            "learn about the solar system", "build a simple circuit",
            "explain gravity to someone new to physics", "show people how rainbows form",
        ],
        "steps": [
            "start with the basic idea in simple words", "look at a picture or a diagram",
            "connect it to something you see every day", "try a small and safe experiment",
            "read a trusted book or article on the topic", "explain it to a friend to check your understanding",
        ],
    },
    "writing": {
        "acts": [
            "write a short poem about the sea", "write a thank you note", "write a cover letter",
            "start a short story", "write a birthday message for my mom", "improve my essay",
            "write a clear email to my teacher", "write a product description", "write a speech for a wedding",
            "keep a daily journal", "write a haiku about autumn", "summarize a book chapter",
            "write a friendly text to a new neighbor", "write a blog post about my hobby",
            "write a thank-you note to someone who helped me", "write a toast for a person retiring",
        ],
        "steps": [
            "decide who you are writing for", "write a rough first draft without stopping",
            "keep your sentences short and clear", "read it out loud to hear how it sounds",
            "cut the parts that do not help", "end with a warm and clear closing line",
        ],
    },
    "history": {
        "acts": [
            "learn about the ancient Egyptians", "understand the causes of the first world war",
            "learn about the Roman empire", "study the history of printing", "learn about the moon landing",
            "understand the industrial revolution", "learn about the history of the Olympic games",
            "study the Silk Road", "learn about the ancient Greeks", "understand how democracy began",
            "learn about the history of trains", "study the Renaissance", "learn about the Vikings",
            "understand the history of money",
            "learn about a person who explored the Arctic", "learn how people lived in ancient Rome",
        ],
        "steps": [
            "start with a simple timeline of the main events", "read about the people who lived then",
            "look at maps of the period", "compare a few different sources",
            "visit a museum or watch a good documentary", "write down the questions you still have",
        ],
    },
    "health_fitness": {
        "acts": [
            "start running", "sleep better at night", "drink more water", "build a morning stretching routine",
            "start lifting weights safely", "eat more vegetables", "reduce stress after work",
            "improve my posture at my desk", "train for a five kilometer race", "do a push up correctly",
            "walk more every day", "stay active in winter", "warm up before exercise", "recover after a long hike",
            "help a person warm up before a run", "teach people a simple stretch",
        ],
        "steps": [
            "start slowly and build up over a few weeks", "set a small goal you can keep",
            "listen to your body and rest when you need to", "drink water and eat well",
            "track your progress in a notebook", "ask a doctor if you have a health condition",
        ],
    },
    "gardening": {
        "acts": [
            "grow tomatoes on a balcony", "plant tulip bulbs", "start a compost pile", "water a garden properly",
            "grow herbs indoors", "prune a rose bush", "plant a tree", "grow strawberries in pots",
            "keep houseplants healthy", "start seeds in spring", "make a small vegetable garden",
            "attract bees to my garden", "care for a cactus", "mulch a flower bed",
            "give a person a plant as a gift", "teach someone to prune roses",
        ],
        "steps": [
            "choose a spot with the right amount of sun", "use good soil and a pot with drainage",
            "water deeply but not too often", "feed the plants a little in the growing season",
            "check the leaves for problems every week", "be patient and enjoy the process",
        ],
    },
    "music": {
        "acts": [
            "learn to play the guitar", "read sheet music", "practice the piano every day", "sing in tune",
            "write a simple song", "tune a violin", "learn to play the drums", "record a song at home",
            "start a small band", "learn music theory", "play chords on a ukulele", "improve my rhythm",
            "choose a first instrument", "practice scales",
            "teach people to sing in harmony", "help someone tune a guitar",
        ],
        "steps": [
            "practice a little every day", "start slowly and use a metronome", "learn a few easy songs you like",
            "record yourself and listen back", "take a lesson or follow a good video course",
            "play with other people when you can",
        ],
    },
}
# fmt: on
