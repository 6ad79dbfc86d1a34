"""The data tables of the story generator (tinygpt.data.stories.generator): word lists, names, settings and phrasings.

Data only; the generation logic lives in tinygpt.data.stories.generator. A table is written compactly with `words` (one
whitespace-separated string) or `lines` (one entry per line); both drop duplicates and keep order, so that
generation stays deterministic for a seed. Phrasings are `str.format` templates filled in from the story
fields (`{name}`, `{he}`, `{obj}`, ...) that `stories.Teller` draws.
"""

from __future__ import annotations


def words(text: str) -> tuple[str, ...]:
    """A table written as one whitespace-separated string, duplicates dropped (order kept: determinism)."""
    return tuple(dict.fromkeys(text.split()))


def lines(text: str) -> tuple[str, ...]:
    """A table written one entry per line."""
    return tuple(dict.fromkeys(line.strip() for line in text.strip().splitlines()))


# ------------------------------------------------------------------------------------------- grammar

# Words whose first letter misleads: a vowel sounding like "you"/"won", or a silent "h".
A_BEFORE = ("uni", "use", "usu", "ute", "eu", "one", "once")
AN_BEFORE = ("hour", "honest", "honor", "heir")
IRREGULAR_PAST = dict(pair.split(":") for pair in words("""
    be:was begin:began bite:bit blow:blew break:broke bring:brought build:built buy:bought catch:caught
    choose:chose come:came cut:cut dig:dug do:did draw:drew drink:drank drive:drove eat:ate fall:fell feed:fed
    feel:felt fight:fought find:found fly:flew forget:forgot freeze:froze get:got give:gave go:went grow:grew
    hang:hung have:had hear:heard hide:hid hit:hit hold:held keep:kept know:knew lead:led leave:left let:let
    light:lit lose:lost make:made meet:met put:put read:read ride:rode ring:rang run:ran say:said see:saw
    sell:sold send:sent shake:shook shine:shone sing:sang sink:sank sit:sat sleep:slept slide:slid speak:spoke
    spend:spent spin:spun stand:stood stick:stuck sweep:swept swim:swam swing:swung take:took teach:taught
    tear:tore tell:told think:thought throw:threw wake:woke wear:wore win:won write:wrote
"""))
# One-syllable verbs ending consonant-vowel-consonant double the last letter: hop -> hopped.
DOUBLING = frozenset(words("""
    bat clap chat drop grab hop hug jog knit mop nap pat pet plan pop rub scrub shop skip slip spot step stir
    stop tap tip trip tug wag zip
"""))


# ---------------------------------------------------------------------------------------------- cast

GIRL_NAMES = words("""
    Lily Mia Sue Lucy Amy Anna Emma Sara Zoe Ella Molly Rosie Daisy Kate Jenny Ruby Grace Chloe Maya Sophie Lola
    Nora Ava Ellie Hannah Julia Rose Tina Olivia Bella Jane Kim Pam Sally Lisa Mary Lena Ivy Aisha Amara Priya Mei
    Yuki Hana Sakura Fatima Leila Zara Nia Imani Ayesha Sofia Lucia Camila Valentina Isabel Elena Carmen Rosa
    Paloma Ines Chiara Giulia Freya Astrid Ingrid Greta Elsa Heidi Anya Olga Katya Mila Nadia Tara Esme Iris Luna
    Stella Hazel Violet Willow Poppy Clara Alice Matilda Harriet Edith Martha Beth Josie Kitty Penny Holly Jade
    Amber Ruth Naomi Leah Miriam Abigail Eva Thea Maisie Elsie Millie Tilly Evie Phoebe Isla Ada Orla Maeve Aoife
    Bridget Dana Gina Lara Nina Rita Vera Wendy Polly Betty Abby Gemma Jasmine Layla Noor Yasmin Samira Amina
    Zainab Ama Efua Adaeze Chioma Ngozi Kemi Lin Xiu Ling Jia Mina Aiko Emi Keiko Noa Kiara Ananya Diya Meera Kavya
    Riya Asha Sita Leilani Kalani Malia Alana Tala Winona Marisol Lupita Ximena Paola Renata Bianca Flora Mabel
    Nell Winnie Trudy Fern Juniper Sadie Kira Talia Ayla Selin Defne Elif Zeynep Ana Marta Katarina Zofia Lotte
    Femke Saskia Sanne Agnes Beatrice Cora Delia Fiona Gwen Helen Irene Joy Kelly Laura Megan Nancy Opal Paige
    Quinn Rachel Sasha Tessa Uma Vicky Yara Zelda Anika Bea Calla Dina Edie Fay Gilda Hedy Isadora Juno Keira
    Adele Bonnie Cecily Daphne Eliza Frances Georgia Hattie Ida Jolene Kathleen Lorna Marigold Nettie Odette
    Petra Rhoda Sylvie Tamsin Ursula Verity Wren Xenia Yvonne Zinnia Aditi Bhavna Chandra Deepa Gita Indira Jaya
    Lakshmi Nisha Padma Rani Shanti Usha Akosua Abena Dayo Folake Halima Kamaria Lulu Makena Nala Oni Safiya Zuri
    Aroha Mere Ngaio Kaya Aponi Dyani Catalina Dolores Esperanza Graciela Josefina Luz Mercedes Pilar Soledad
    Fleur Margot Elodie Colette Amelie Brigitte Liesel Anneliese Gudrun Sigrid Solveig Linnea Maja Ebba Tove
    Dagny Ilse Hanne Mirela Oksana Svetlana Tatiana Yelena Zora Mirela Daria Alina Lidia Ayaka Chiyo Fumiko
    Haruka Kaori Mariko Naoko Rin Sayuri Tomoko Yumi Ji-woo Seo-yeon Min-ji Hye-jin Bo-ra Anh Linh Mai Thuy Hoa
    Aisling Ciara Eimear Grainne Roisin Sorcha Carys Eira Ffion Seren Mairi Isobel Morven Kenna Orla Briony
    Hinemoa Moana Kailani Noelani Pualani Anahera Akira Beatriz Constanza Florencia Guadalupe Ofelia Rocio
""")
BOY_NAMES = words("""
    Tim Tom Ben Sam Max Jack Leo Jake Finn Timmy Bob Joe Alex Noah Luke Mark Dan Ollie Henry Billy Jim Eli Owen
    Theo Ryan Adam Kevin Peter Oscar Bobby Jimmy Jacob Toby Sid Ned Paul Nick Danny Omar Kenji Ravi Mateo Kwame
    Diego Arjun Hiro Luca Jamal Tariq Chen Wei Ivan Sven Kofi Malik Pablo Yusuf Ali Amir Hassan Karim Rami Samir
    Idris Musa Emeka Chidi Tunde Femi Jabari Zane Kai Koa Mano Rohan Dev Aarav Vikram Sanjay Nikhil Kiran Raj
    Akira Haru Ren Sora Taro Yuto Jun Hao Bao Lei Ming Tao Jose Carlos Juan Miguel Rafael Andres Santiago Emilio
    Hugo Marco Enzo Paolo Matteo Nico Lars Erik Olaf Nils Anders Bjorn Felix Oskar Anton Jonas Lukas Milo Otis
    Arlo Jasper Rufus Alfie Archie Charlie Freddie George Harry Louis Teddy Stanley Walter Arthur Albert Frank
    Ernie Gus Hank Abe Ike Cody Dylan Evan Gavin Ian Kyle Liam Mason Nathan Ethan Caleb Isaac Micah Seth Simon
    Victor Xavier Zack Rory Sean Declan Connor Brendan Fergus Angus Callum Ewan Jamie Robbie Dmitri Misha Pavel
    Tomas Mikael Pedro Tiago Bruno Rui Ahmed Bilal Faris Zaid Kemal Emre Baris Ozan Yosef Eitan Ari Benji Cyrus
    Darius Ezra Gideon Jonah Levi Reuben Tobias Amos Barnaby Cedric Desmond Edgar Flynn Giles Horace Iggy Jules
    Kit Lenny Monty Norris Ozzie Percy Quentin Reggie Sonny Travis Vince Wally Yuri Zeke Ashok Bhavin Chirag Omid
    Abel Bertie Clement Dougal Elliot Fabian Gregor Hamish Ignatius Jasper Kenneth Lionel Magnus Nigel Orson
    Phineas Rupert Sebastian Tristan Ulysses Virgil Winston Alistair Benedict Crispin Dominic Edmund Ferdinand
    Gulliver Humphrey Anand Balu Dinesh Ganesh Harish Jatin Mohan Naveen Prakash Suresh Vijay Adebayo Chinedu
    Dumisani Ekow Jomo Kato Lwazi Mandla Obi Sipho Tendai Ayaan Bashir Dawud Hamza Ilyas Jibril Khalid Nabil
    Rashid Sami Tamir Ahanu Chayton Elan Hinto Takoda Alonso Benito Cruz Esteban Fernando Gonzalo Ignacio
    Joaquin Lorenzo Marcelo Ramon Salvador Ulises Bastien Cosme Damien Etienne Florian Gaspard Lucien Mathis
    Remi Thibault Axel Birger Einar Gunnar Henrik Ivar Leif Magne Orvar Stig Torsten Viggo Alexei Boris Fedor
    Gleb Igor Kolya Lev Oleg Roman Vadim Daiki Eiji Goro Isamu Kaito Makoto Riku Shota Takumi Yuki Do-yun
    Ha-joon Min-jun Seo-jun Ji-ho Anh Bao Duc Khoa Minh Quang Thanh Tuan Cormac Eoin Padraig Ronan Tadhg
    Dafydd Emrys Gethin Rhys Tomos Alasdair Ruaridh Lachlan Keanu Kalani Makoa Nainoa Tevita Sione Manaia
""")
ANIMAL_NAMES = words("""
    Spot Fluffy Buddy Whiskers Coco Pip Bobo Sunny Rex Mittens Hoppy Benny Kiki Rocky Bubbles Nibbles Patch Fuzzy
    Dot Pepper Chip Biscuit Muffin Peanut Pumpkin Ginger Cookie Bandit Shadow Socks Oreo Pebbles Button Noodle
    Waffles Tango Ziggy Zuzu Lulu Rusty Goldie Snowball Squeaky Twinkle Bouncer Scout Bingo Clover Maple Pickles
    Nutmeg Sprout Truffle Jellybean Marshmallow Acorn Blossom Puddles Bramble Thistle Custard Dumpling Fudge
    Gizmo Hopscotch Jingles Kipper Lolly Mochi Nugget Pudding Quill Rascal Smudge Tofu Velvet Wiggles Yoyo
    Zippy Bean Cinnamon Dusty Echo Freckles Gumdrop Honey Inky Jasper Sparky Mango Olive Popcorn Sesame Tumble
""")
# Kinds an animal hero or friend can be: they walk, play and talk in the stories.
ANIMAL_KINDS = words("""
    cat dog bunny bear bird fox mouse duck frog puppy kitten squirrel owl turtle pig lion elephant monkey lamb
    horse deer hedgehog penguin goat cow chick hen goose raccoon otter beaver badger mole koala panda tiger zebra
    giraffe hippo kangaroo donkey mouse rabbit wolf moose puffin unicorn dinosaur dragon piglet pony llama camel
    bat crow robin sparrow chipmunk hamster ferret sheep calf foal cub walrus seal gorilla leopard cheetah
    lemur sloth armadillo porcupine skunk opossum weasel stoat vole shrew toad newt salamander gecko iguana
    ostrich flamingo peacock pelican stork heron toucan parrot magpie woodpecker bluebird hummingbird swan
    turkey rooster bison yak alpaca reindeer elk buffalo crocodile alligator
""")
PETS = (  # (kind, the sound it makes: after '{pet}' in a sentence)
    ("dog", "barked"), ("cat", "meowed"), ("puppy", "yipped"), ("kitten", "mewed"), ("bunny", "thumped the ground"),
    ("hamster", "squeaked"), ("parrot", "squawked"), ("guinea pig", "squeaked"), ("canary", "chirped"),
    ("goat", "bleated"), ("duck", "quacked"), ("pony", "neighed"), ("piglet", "oinked"), ("mouse", "squeaked"),
    ("ferret", "chattered"), ("hen", "clucked"), ("gerbil", "squeaked"), ("budgie", "tweeted"),
    ("cockatoo", "screeched"), ("chinchilla", "squeaked"), ("lamb", "baaed"), ("rabbit", "thumped the ground"),
)
TRAITS = words("""
    kind curious happy brave shy playful friendly silly gentle cheerful clever careful sweet busy funny helpful
    smart lively quiet bouncy chatty dreamy eager giggly honest hopeful jolly joyful loving lucky merry patient
    polite sleepy sporty thoughtful bold bright caring creative daring energetic generous wise adventurous
    artistic cuddly noisy tidy cheeky good proud fast clumsy spirited plucky sunny spunky
    witty nimble mischievous dreamy restless peaceful sensible imaginative inventive talkative
""")
KID_LOOKS = lines("""
    with curly red hair
    with big brown eyes
    with freckles on {his} nose
    with a gap in {his} front teeth
    with two long braids
    with a bright, happy smile
    who wore round glasses
    with rosy cheeks
    with dark curly hair
    who always wore a yellow raincoat
    with a blue cap that was too big for {him}
    with short spiky hair
    with sparkly green eyes
    with a scraped knee and a big grin
    with long black hair
    who wore striped socks every day
    with a loud, happy laugh
    with a ponytail that bounced when {he} ran
    with dimples in {his} cheeks
    with messy blond hair
    who wore a bright orange backpack
    with bandages on both knees
    with thick eyebrows and a thoughtful face
    who wore muddy sneakers
""")
ANIMAL_LOOKS = lines("""
    with soft gray fur
    with a fluffy tail
    with long floppy ears
    with a black spot on {his} back
    with tiny pink paws
    with bright green eyes
    with a striped tail
    with a shiny wet nose
    with a white patch over one eye
    with fuzzy brown fur
    with little round ears
    with a short curly tail
    with golden fur that shone in the sun
    with big soft feet
    with speckled feathers
    with a wiggly pink snout
    with long whiskers
    with a bushy orange tail
    with stripes down {his} back
""")
PARENTS = ("mom", "dad", "mom", "dad", "grandma", "grandpa", "mama", "papa", "nana", "granddad")
FEMALE_PARENTS = frozenset(("mom", "grandma", "mama", "nana"))
HOMES = lines("""
    in a small house near the woods
    in a little town by the sea
    in a big city
    on a quiet farm
    in a cozy house with a red door
    near a big green park
    in a tiny village
    in a yellow house on a hill
    next to a sunny meadow
    in a blue house at the end of the street
    in a busy city full of tall buildings
    in a cottage by a river
    in a little house with a garden full of roses
    on a sunny island
    in a snowy village in the mountains
    in an old house with a creaky floor
    near a big lake
    in an apartment above a bakery
    at the edge of a deep forest
    in a round house with a green roof
    in a busy town by the harbor
    on a street lined with cherry trees
    in a warm house next to the school
    in a white cottage by the bay
    in a windy town near the hills
    on a farm full of sheep and goats
    in a log cabin under tall pine trees
    in a pink house with a crooked chimney
    in a narrow house squeezed between two shops
    in a lighthouse by the rocky shore
    on a houseboat on a slow, wide river
    in a bungalow surrounded by palm trees
    in a stone cottage with ivy on the walls
    in a farmhouse with a big red barn
    on the top floor of a tall apartment building
    in a little hut by a bamboo forest
    in a mountain village full of goats
    in a desert town with flat white houses
""")


# --------------------------------------------------------------------------------------------- world

COLORS = words("""
    red blue yellow green pink purple orange white golden brown black gray silver teal turquoise lavender
    cream violet crimson navy scarlet amber indigo maroon olive peach mint coral plum ruby emerald beige
""") + ("sky-blue", "lime-green", "bright red", "pale blue", "dark green", "lemon-yellow", "cherry-red", "rosy pink")
LOOKS = words("""
    shiny soft little big pretty new old sparkly tiny special fuzzy wooden squeaky striped spotted bouncy fluffy
    smooth bright colorful cozy funny magic round long heavy small giant glittery painted handmade lucky noisy
    jingly floppy wobbly velvet woolly fancy plain brave dusty curly crinkly squishy stretchy sturdy
    chunky dainty gleaming twinkly speckled rumpled knobbly lumpy shimmery feathery silky bumpy
""") + ("brand-new", "polka-dot", "checkered", "well-loved")
# Singular, portable things, so "it" always agrees and they can be carried, lost and shared.
OBJECTS = words("""
    ball kite doll hat book drum balloon boat train blanket shovel bucket scarf necklace robot puzzle yo-yo
    whistle marble crayon truck spoon box shell bell cup rock ribbon wagon scooter rocket airplane tractor
    umbrella backpack lunchbox flashlight compass telescope harmonica flute tambourine xylophone guitar crown
    cape wand bracelet locket watch mitten sweater jacket raincoat paintbrush pencil notebook kaleidoscope
    pinwheel frisbee skateboard puppet lantern clock mug feather pinecone acorn key coin button tiara badge
    medal trophy flag map basket bus helicopter submarine violin ukulele banjo trumpet magnet accordion
    saxophone tuba clarinet harp bagpipe slingshot boomerang periscope stethoscope abacus globe calculator
    camera binoculars keychain thimble teapot teacup saucer kettle ladle whisk spatula pinafore
    bonnet beret sombrero helmet goggles snorkel flipper surfboard canoe kayak paddle sled toboggan
    wheelbarrow rake hoe trowel bookmark envelope postcard stamp sticker eraser ruler stapler
    pendant brooch tambourine maraca rattle lollipop gumball pinata
""") + lines("""
    teddy bear
    toy car
    jump rope
    spinning top
    music box
    stuffed bunny
    rag doll
    toy boat
    magnifying glass
    toy piano
    snow globe
    piggy bank
    bubble wand
    beach ball
    hula hoop
    sock puppet
    toy soldier
    toy horse
    fire truck
    pirate ship
    treasure chest
    sticker book
    coloring book
    toy dinosaur
    sand pail
    toy tiger
    paper crown
    glass jar
    toy unicorn
""")
PLACES = (  # (place, how to say "there")
    ("park", "in the park"), ("garden", "in the garden"), ("beach", "at the beach"),
    ("forest", "in the forest"), ("backyard", "in the backyard"), ("meadow", "in the meadow"),
    ("farm", "on the farm"), ("playground", "at the playground"), ("lake", "by the lake"),
    ("hill", "on the hill"), ("river", "by the river"), ("zoo", "at the zoo"), ("town square", "in the town square"),
    ("field", "in the big field"), ("woods", "in the woods"), ("pond", "by the pond"),
    ("library", "at the library"), ("market", "at the market"), ("orchard", "in the orchard"),
    ("barn", "in the barn"), ("creek", "by the creek"), ("sandbox", "in the sandbox"),
    ("pumpkin patch", "in the pumpkin patch"), ("school yard", "in the school yard"), ("harbor", "by the harbor"),
    ("valley", "in the valley"), ("old bridge", "by the old bridge"), ("duck pond", "by the duck pond"),
    ("flower field", "in the flower field"), ("little island", "on the little island"),
    ("swimming pool", "at the swimming pool"), ("bus stop", "at the bus stop"), ("cliff top", "on the cliff top"),
    ("vegetable patch", "in the vegetable patch"), ("bamboo grove", "in the bamboo grove"),
    ("riverbank", "on the riverbank"), ("sand dunes", "in the sand dunes"), ("rose garden", "in the rose garden"),
    ("skate park", "at the skate park"), ("fairground", "at the fairground"), ("quarry", "by the old quarry"),
    ("waterfall", "by the waterfall"), ("lighthouse", "by the lighthouse"), ("wheat field", "in the wheat field"),
)
TIMES = lines("""
    One day
    One sunny day
    One morning
    One afternoon
    One bright morning
    One warm day
    On a windy day
    One evening
    One Saturday
    One Sunday morning
    One spring day
    One fall afternoon
    Early one morning
    One cloudy day
    After breakfast one day
    On the first day of summer
    One quiet afternoon
    One breezy morning
    Last summer
    One cool evening
    On a bright spring morning
""")
WEATHER = lines("""
    The sun was shining and the birds were singing.
    It was a warm spring morning, and the flowers were in bloom.
    Autumn leaves were falling, red and gold and brown.
    A soft breeze was blowing through the trees.
    Big fluffy clouds floated across the blue sky.
    It was a hot summer day, and the air smelled like cut grass.
    The morning was cool, and the grass was wet with dew.
    The sky was as blue as a robin's egg.
    Bees were buzzing from flower to flower.
    The wind was playful that day, and it tugged at everyone's hats.
    It was the kind of day when everything looks golden.
    Little white butterflies were dancing over the grass.
    The air was fresh and smelled like pine trees.
    A gentle rain had just stopped, and everything sparkled.
""")
ACTIVITIES = lines("""
    play with {his} toys
    run in the grass
    look at the stars
    sing songs
    draw pictures
    build sand castles
    read books with {his} {parent}
    jump in puddles
    pick flowers
    play hide and seek
    chase butterflies
    dance to music
    climb trees
    help in the kitchen
    ride {his} bike
    splash in the water
    play with {his} friends
    watch the clouds
    paint with bright colors
    collect pretty rocks
    make funny faces
    play ball outside
    feed the ducks
    bake cookies
    plant seeds
    blow bubbles
    roll down the hill
    swing on the swings
    slide down the slide
    hunt for bugs
    count the stars
    tell jokes
    play the drums
    play dress-up
    build towers with blocks
    dig in the dirt
    make mud pies
    catch fireflies
    go fishing with {his} {parent}
    visit the library
    do puzzles
    play tag
    look for shells
    play the piano
    whistle little tunes
    hop like a frog
    spin in circles
    feed the chickens
    water the flowers
    make paper airplanes
    fly {his} kite
    skip stones on the pond
    sing in the bath
    stack smooth pebbles
    listen to the rain
    write little poems
    make necklaces out of beads
    throw sticks for the dogs
    watch the trains go by
    knit long scarves
    play in the snow
    tell stories
    sort buttons by color
    wade in the stream
    explore the attic
    race paper boats
    balance on logs
    build little houses for bugs
    weave baskets out of grass
    press flowers in a big book
    doodle in {his} notebook
    sketch the birds in the garden
    study the map of the world
    hum along to the radio
    scribble rhymes on scraps of paper
    gather acorns in the fall
    toss pebbles into the pond
    float leaves down the creek
    shake the apple tree
    peek into birds' nests
    wander through the fields
    sail {his} toy boat in the bath
    solve riddles
    march like a soldier
    twirl ribbons in the wind
    juggle oranges
    feed carrots to the horses
    brush the pony's mane
    giggle at silly cartoons
""")
SNACKS = lines("""
    cookies
    apples
    grapes
    cherries
    strawberries
    blueberries
    crackers
    cupcakes
    muffins
    pretzels
    carrot sticks
    cheese sandwiches
    peanut butter sandwiches
    orange slices
    raisins
    plums
    peaches
    pears
    oatmeal cookies
    banana muffins
    jam tarts
    cinnamon rolls
    rice balls
    dumplings
    little pancakes
    tangerines
    apricots
    cheese crackers
    honey cakes
    sugar cookies
    apple slices
    mango slices
    berry tarts
    gingerbread men
    walnuts
    almonds
    figs
    dates
    kiwis
    nectarines
    pistachios
    pomegranate seeds
    sesame bars
    coconut macaroons
    lemon bars
    pumpkin muffins
    veggie wraps
    hard-boiled eggs
    tortilla chips
    cucumber sandwiches
""")
SEARCH_SPOTS = lines("""
    under a bench
    in the tall grass
    under a big tree
    near the fence
    behind a rock
    in the bushes
    inside an old box
    by the gate
    in the sand
    next to the swings
    behind the flowers
    under a pile of leaves
    under the slide
    behind the shed
    in a hollow log
    beside the water fountain
    under the picnic table
    in a patch of clover
    next to a mossy stone
    behind the big oak tree
""")
FOUND_BY = lines("""
    a little dog was playing with it
    a bird had put it in its nest
    a squirrel was sitting on it
    it was stuck in a bush
    it was hiding under some leaves
    a puppy was sleeping next to it
    the wind had blown it near the pond
    a cat was batting it with its paw
    a family of ducks was sitting around it
    a snail was slowly climbing over it
    a goat was sniffing it with great interest
    it had rolled into a puddle
    a hedgehog had curled up right beside it
    a crow was pecking at it, curious and bold
    it was tangled in a spider's web, shining with dew
    a little boy was holding it, looking for its owner
""")
FLOWERS = words("""
    roses tulips daisies marigolds poppies lilies pansies violets bluebells buttercups dandelions sunflowers
    peonies daffodils lilacs orchids snowdrops primroses cornflowers foxgloves irises zinnias petunias
""")
TREES = words("oak maple willow pine birch apple cherry elm chestnut plum lemon palm beech fir cedar poplar")
BIRDS = words("robins sparrows bluebirds finches blackbirds wrens jays larks thrushes swallows doves starlings")
BUGS = words("ladybugs beetles crickets grasshoppers dragonflies caterpillars ants moths bumblebees butterflies")
SCENERY = lines("""
    There were {flowers} everywhere, and {birds} were singing in the {tree} trees.
    {Bugs} hopped and buzzed in the grass, and the {tree} trees swayed in the breeze.
    The air smelled of {flowers}, and {birds} chirped high above.
    Under a tall {tree} tree, {flowers} nodded in the sun.
    The path was lined with {flowers}, and {bugs} were busy among the petals.
    Somewhere in the {tree} trees, {birds} were calling to each other.
""")
SOUNDS = lines("""
    Crunch, crunch went the leaves under their feet.
    Splish, splash went the puddles.
    Tick-tock, tick-tock went the big clock on the wall.
    Buzz, buzz went the bees in the clover.
    Whoosh! A gust of wind rushed past.
    Somewhere far away, a dog was barking.
    Ding-dong, ding-dong rang the old church bell.
    Clip-clop, clip-clop went a horse on the road.
    Pitter-patter went a little rain on the leaves.
    Squeak, squeak went the rusty gate.
    Honk, honk! A line of geese flew overhead.
    Ribbit! A frog jumped out of the way.
""")
SCENES = WEATHER + SCENERY
FOODS = lines("""
    spaghetti
    porridge with honey
    mashed potatoes
    rice pudding
    pancakes with syrup
    chicken soup
    fish fingers
    tomato soup
    mango ice cream
    cheese on toast
    fried rice
    corn on the cob
    blueberry pie
    grilled cheese
    lentil soup
    scrambled eggs
    baked beans
    peach cobbler
    sushi
    waffles
    curry with rice
    falafel
    pita bread with hummus
    jollof rice
    fried plantains
    pierogi
    ramen
    couscous
    gumbo
    lasagna
    fish stew
    dumplings
    meatballs
    apple crumble
    pumpkin soup
    noodles with peanut sauce
    potato pancakes
    rice and beans
    strawberry jam sandwiches
    vanilla pudding
    carrot cake
    cherry pie
""")
FAVORITES = lines("""
    {His} favorite food was {food}.
    {His} favorite color was {fav_color}.
    {He} lived with {his} {parent} and a {pet_kind} named {pet}.
    {His} favorite flowers were {flowers}.
    {He} was always humming a little song.
    {He} could eat {food} every single day.
    {He} had a room full of books about {bugs}.
    {He} loved the color {fav_color} so much that {he} wanted to paint everything {fav_color}.
""")


# ------------------------------------------------------------------------------- feelings and speech

SAD = ("sad", "very sad", "upset", "worried", "unhappy", "gloomy", "miserable", "glum", "teary")
HAPPY = ("happy", "very happy", "so happy", "glad", "proud", "excited", "delighted", "overjoyed", "cheerful",
         "thrilled", "joyful")
SCARED = ("scared", "afraid", "very scared", "nervous", "frightened", "jumpy", "uneasy")
# Speech verbs drawn afresh each time a template uses them; always written after the speaker ('{name} {glad}').
SPEECH = {
    "glad": ("cheered", "laughed", "shouted", "said happily", "giggled", "said with a big smile", "exclaimed",
             "beamed", "squealed", "sang out"),
    "sadly": ("sniffed", "said sadly", "cried", "sobbed", "whispered", "said in a small voice", "mumbled",
              "said with a sigh"),
    "softly": ("whispered", "said softly", "said gently", "said kindly", "murmured", "said quietly"),
    "asked": ("asked", "asked softly", "wondered aloud", "asked gently", "asked quietly"),
    "replied": ("said", "replied", "answered", "said at once"),
    "called": ("called", "shouted", "yelled", "called out", "hollered"),
}


# -------------------------------------------------------------------------------------- shared beats

# Beats that many arcs tell: how a story opens, the hero's friend and pet, thanks and endings.
OPENINGS = lines("""
    Once upon a time, there was {a_trait} little {kind} named {name}.
    Once upon a time, there was a little {kind} named {name}. {He} was very {trait}.
    Once upon a time, {home}, there lived {a_trait} {kind} named {name}.
    There was once {a_trait} {kind} called {name}.
    {name} was {a_trait} little {kind} who lived {home}.
    Once there was {a_kind} named {name} who lived {home}.
    In a land far away, there was {a_trait} little {kind}. {His} name was {name}.
    Once upon a time, there was a little {kind}. {His} name was {name}, and {he} was very {trait}.
    {name} was {a_kind} {looks}.
    Not long ago, {home}, there was {a_trait} {kind} {looks}. {His} name was {name}.
    {name} was {a_trait} {kind} {looks}. {He} lived {home}.
    Long ago, {home}, there lived {a_kind} named {name}.
    Once upon a time, there was {a_kind} {looks}. Everyone called {him} {name}.
    There once was {a_trait} {kind} named {name} who lived {home}.
    {name} was only a little {kind}, but {he} was very {trait}.
""")
LIKES = lines("""
    {He} loved to {activity}.
    Every day, {he} liked to {activity}.
    {His} favorite thing to do was to {activity}.
    More than anything, {name} loved to {activity}.
    {name} liked to {activity} after lunch.
    {He} always wanted to {activity}.
    When the weather was nice, {name} liked to {activity}.
    {name} could {activity} all day long.
    On sunny afternoons, {name} would {activity} for hours.
""")
INTRO_FRIEND = lines("""
    {name} had a best friend, {a_fkind} named {friend}.
    {name}'s best friend was {a_fkind} named {friend}.
    {name} had a friend named {friend}. {friend} was {a_fkind} who lived close by.
    {name}'s best friend was {friend}, {a_ftrait_fkind} from down the street.
    {name} and {friend} had been friends for as long as they could remember.
""")
INTRO_PET = lines("""
    {name} had {a_pet_kind} named {pet}.
    {name} had a pet {pet_kind} called {pet}, and they went everywhere together.
    {name}'s best friend in the world was {pet}, {his} little {pet_kind}.
    {name} lived with {his} {parent} and a {pet_kind} named {pet}.
""")
THANKS = lines("""
    "Thank you, {friend}!" said {name}. "You are a good friend."
    "Thank you so much!" {name} said, and gave {friend} a big hug.
    {name} smiled at {friend}. "Thank you for helping me," {he} said.
    "You are the best, {friend}!" said {name} with a big smile.
    "I could not have done it without you," {name} told {friend}.
""")
FRIEND_ENDINGS = lines("""
    From that day on, {name} and {friend} were best friends.
    {name} and {friend} played together until the sun went down.
    After that, {name} and {friend} did everything together.
    They laughed and played all day long, and it was the best day ever.
    After that day, {name} and {friend} {activity_past} together whenever they could.
    The two friends walked home side by side, talking and laughing all the way.
""")
HAPPY_ENDINGS = lines("""
    It was the best day ever.
    {name} would never forget that day.
    That night, {name} fell asleep with a big smile on {his} face.
    And they all lived happily ever after.
    It was a day full of happy surprises.
    When {name} went to bed, {he} was still smiling.
    {name} hugged {his} {parent} and said it was the best day of {his} life.
""")


# ---------------------------------------------------------------------------------------------- arcs
# Tables of one arc each (or of a few), in the order of the arcs in stories.py; a tuple row fills several
# fields at once, e.g. (what is scary, the brave act, what it turned out to be).

# fear
FEARS = (  # (what is scary, the brave act, what it turned out to be)
    ("the dark", "turn off the light", "the room was just the same, only quiet and cozy"),
    ("the big dog next door", "say hello to the dog", "the dog only wanted to play"),
    ("the tall slide", "climb up the slide", "it was fast and fun, like flying"),
    ("the deep water", "put {his} feet in the water", "the water was cool and nice"),
    ("the loud thunder", "look out the window", "the storm was far away and the rain made pretty sounds"),
    ("the old tree in the yard", "touch the old tree", "the tree was just old and full of singing birds"),
    ("the new school", "walk into the classroom", "the teacher was kind and there were many toys"),
    ("the noisy vacuum", "push the button", "it was only a loud machine that ate the dust"),
    ("the doctor", "sit on the doctor's big chair", "the doctor was gentle and gave {him} a sticker"),
    ("the big waves", "hold {his} {parent}'s hand and step into the sea", "the waves only tickled {his} toes"),
    ("the spider in the bathtub", "look at it closely", "the spider was tiny and more scared than {he} was"),
    ("the high diving board", "jump off the board", "the water caught {him} like a soft, wet hug"),
    ("the dentist", "open {his} mouth wide", "it did not hurt at all, and {his} teeth were shiny and clean"),
    ("the creaky stairs to the basement", "go down the stairs with a flashlight",
     "the basement was full of old toys and jars of jam"),
    ("the goose at the pond", "throw the goose some bread", "the goose only wanted a snack"),
    ("riding the tall horse", "climb onto the horse", "the horse walked slowly and gently, like a rocking chair"),
    ("the shadows on the wall", "look at the shadows", "they were only the branches of the tree outside"),
    ("the crowded bus", "climb onto the bus", "the driver smiled and there was a seat by the window"),
)

# helping
TROUBLES = (  # (animal in trouble, what is wrong, how to help)
    ("a little bird", "had a hurt wing", "wrapped the wing with a soft cloth"),
    ("a small kitten", "was stuck up in a tree", "brought a ladder and got it down"),
    ("a tiny puppy", "was lost and cold", "gave it a warm blanket and found its home"),
    ("a baby duck", "could not find its mom", "walked it back to the pond"),
    ("a little frog", "was stuck in a jar", "opened the jar very slowly"),
    ("a small bunny", "had a thorn in its paw", "pulled the thorn out gently"),
    ("a young squirrel", "was very hungry", "shared some nuts and bread"),
    ("a little turtle", "was on its back and could not turn over", "turned it over very carefully"),
    ("a baby hedgehog", "was tangled in an old net", "cut the net away, one string at a time"),
    ("a small fish", "was flapping on the dry sand", "scooped it up and put it back in the water"),
    ("a tired bee", "was lying still on the path", "gave it a drop of sugar water on a spoon"),
    ("a little mouse", "had fallen into a bucket", "tipped the bucket over so it could climb out"),
    ("a lost lamb", "was crying by the road", "led it back to the farm"),
    ("a baby owl", "had fallen out of its nest", "put it back in a basket tied to the tree"),
    ("a muddy piglet", "was stuck in a deep puddle", "pulled it out with a long rope"),
    ("a small seal", "had a plastic ring around its neck", "carefully slipped the ring off"),
)

# warning
WARNINGS = (  # (what not to do, why, what happened)
    ("touch the hot stove", "it is very hot", "{he} burned {his} finger a little"),
    ("play near the pond", "you might fall in", "{he} slipped and fell into the cold water"),
    ("climb the tall shelf", "it is not safe", "the shelf shook and a vase fell and broke"),
    ("eat the cookies before dinner", "you will not be hungry for dinner", "{he} got a tummy ache"),
    ("run with scissors", "you could get hurt", "{he} tripped and cut {his} hand a little"),
    ("go out in the rain without a coat", "you will get sick", "{he} got wet and started to sneeze"),
    ("play with the ball in the house", "something might break", "the ball hit a lamp and it broke"),
    ("go too far into the woods", "you could get lost", "{he} could not find the way back"),
    ("leave the gate open", "the chickens will run away", "all the chickens ran out into the road"),
    ("jump on the bed", "you might fall off", "{he} bounced too high and bumped {his} head"),
    ("pick the roses", "they have sharp thorns", "a thorn pricked {his} thumb"),
    ("feed the goat {his} sandwich", "bread is not good for goats", "the goat ate the paper bag too and got a tummy ache"),
    ("paint on the walls", "the paint will not come off", "the wall was covered in purple spots"),
    ("stay up so late", "you will be tired tomorrow", "{he} fell asleep during the school play"),
    ("lean back on {his} chair", "you could tip over", "the chair tipped over and {he} landed on the floor"),
    ("splash in the mud in {his} new shoes", "they will get dirty", "{his} new shoes were brown with mud"),
)

# rainy_day
RAIN_GAMES = lines("""
    built a fort with pillows and blankets
    had a picnic on the living room floor
    played a game with cards
    made paper boats
    read stories under a blanket
    painted pictures of the sun
    baked muffins together
    put on a puppet show with old socks
    made a tent out of chairs and sheets
    danced to silly songs in the kitchen
    did a giant puzzle with a thousand pieces
    made hats out of newspaper
    played hide and seek all over the house
    drew a map of a pretend island
    made pancakes shaped like animals
""")

# new_skill
SKILLS = (  # (skill, how you fail at first, what success looks like)
    ("ride a bike", "{he} wobbled and fell down", "{he} rode all the way down the street"),
    ("fly a kite", "the kite fell to the ground", "the kite flew high up in the sky"),
    ("swim", "{he} splashed and swallowed some water", "{he} swam from one side to the other"),
    ("bake a cake", "the cake was flat and burnt", "the cake was big, soft and sweet"),
    ("tie {his} shoes", "the laces got all tangled", "{he} made two perfect bows"),
    ("whistle", "only air came out", "a loud, happy whistle came out"),
    ("jump rope", "the rope hit {his} feet", "{he} jumped ten times in a row"),
    ("climb the big tree", "{he} slipped off the first branch", "{he} sat on the highest branch and saw the whole town"),
    ("read a whole book", "the long words got mixed up", "{he} read the last page all by {himself}"),
    ("play the piano", "the notes sounded wrong and squeaky", "{he} played a whole song without stopping"),
    ("skate on the ice", "{his} feet slid out and {he} sat down hard", "{he} glided across the pond like a bird"),
    ("write {his} name", "the letters came out big and crooked", "{he} wrote {his} name neatly on the first line"),
    ("catch a ball", "the ball bounced off {his} hands", "{he} caught the ball five times in a row"),
    ("do a cartwheel", "{he} landed in a heap on the grass", "{he} spun over like a wheel and landed on {his} feet"),
    ("juggle three balls", "the balls flew everywhere", "the three balls went round and round in the air"),
    ("paint a horse", "the horse looked like a lumpy potato", "the horse looked so real it almost galloped off the page"),
    ("knit a scarf", "the yarn tangled into a big knot", "{he} finished a long, striped scarf"),
    ("row a boat", "the boat just went round in circles", "the boat glided straight across the lake"),
)

# gift
GIFTS = lines("""
    drew a big picture of the two of them
    picked a bunch of pretty flowers
    made a card with a big heart
    baked some little cookies
    made a necklace out of shells
    painted a smooth rock
    built a tiny house out of sticks
    wrote a song
    made a bracelet out of colorful beads
    sewed a little pillow shaped like a star
    folded a paper crane
    made a crown out of daisies
    filled a jar with shiny pebbles
    made a bookmark with a pressed leaf
""")

# discovery
WONDERS = (  # (what is found, where, what it does)
    ("a shiny stone", "under a bush", "it glowed softly and made {him} feel warm inside"),
    ("an old wooden box", "in the attic", "inside were pictures of {his} {parent} as a child"),
    ("a talking frog", "by the pond", "it knew the names of all the stars"),
    ("a tiny door", "at the bottom of a tree", "behind it lived a family of mice having a party"),
    ("a magic feather", "on the grass", "when {he} held it, {he} could float a little above the ground"),
    ("a map", "inside an old book", "it led to a secret garden full of flowers"),
    ("a little star", "in the backyard", "it had fallen from the sky and wanted to go home"),
    ("a golden key", "in the sand", "it opened a small chest full of colorful buttons"),
    ("a magic paintbrush", "behind the shed", "whatever {he} painted with it came to life"),
    ("a singing shell", "at the edge of the water", "when {he} held it to {his} ear, it hummed a sweet song"),
    ("an old lamp", "in a dusty corner of the attic", "when {he} rubbed it, warm light filled the room"),
    ("a tiny dragon egg", "in a nest of moss", "it hatched into a dragon no bigger than a teacup"),
    ("a silver bell", "in the tall grass", "every time it rang, the flowers nearby opened up"),
    ("a pair of red boots", "by the garden gate", "they let {him} jump as high as the rooftops"),
    ("a glass marble", "in a crack in the sidewalk", "inside it, a tiny snowstorm swirled"),
    ("an acorn made of gold", "under the oak tree", "it whispered the secrets of the forest"),
)

# trip
TRIPS = (  # (where to, how, three sights, what they did there)
    ("the seaside", "by train", "tall waves", "white seagulls", "a red and white lighthouse",
     "built a castle in the sand"),
    ("the mountains", "in the car", "tall pine trees", "a roaring waterfall", "a goat standing on a rock",
     "had a picnic by a cold, clear stream"),
    ("the city", "on a big bus", "tall buildings", "busy streets", "a band playing in the square",
     "ate ice cream in a little cafe"),
    ("a farm in the country", "in an old truck", "cows in a green field", "a big red barn",
     "baby pigs rolling in the mud", "fed the hens and collected eggs"),
    ("the zoo", "on the bus", "a tall giraffe", "a sleepy lion", "monkeys swinging from ropes",
     "watched the penguins have their lunch"),
    ("an island", "on a little boat", "dolphins jumping in the water", "palm trees", "a beach with pink sand",
     "looked for crabs in the rock pools"),
    ("the aquarium", "on the train", "jellyfish glowing in the dark", "an octopus hiding in a cave",
     "a sea turtle gliding by", "touched a starfish in the touch pool"),
    ("a big museum", "on the subway", "huge dinosaur bones", "old paintings in golden frames",
     "a real rocket from space", "drew pictures of the dinosaurs"),
    ("the desert", "in a camper van", "tall cactus plants", "red rocks", "a lizard resting in the sun",
     "watched the stars come out at night"),
    ("a snowy village", "by train", "houses covered in snow", "icicles hanging from the roofs", "a frozen pond",
     "went sledding down a long hill"),
    ("the fair", "in the car", "a giant Ferris wheel", "bright lights", "a clown juggling five balls",
     "rode the merry-go-round"),
    ("an old castle", "by boat", "tall stone towers", "a deep moat", "old suits of armor",
     "climbed to the top of the tallest tower"),
    ("a big lake", "on their bikes", "ducks on the water", "a wooden dock", "tiny silver fish near the shore",
     "rowed a little boat across the water"),
    ("the rainforest garden", "on a shuttle bus", "giant green leaves", "bright red parrots",
     "butterflies as big as hands", "walked across a bridge high in the trees"),
    ("a campsite in the woods", "in a car full of tents", "tall trees", "a bubbling brook", "a family of deer",
     "toasted marshmallows over a campfire"),
    ("a sunflower farm", "on a tractor ride", "rows and rows of sunflowers", "a scarecrow in a straw hat",
     "bees buzzing everywhere", "picked the biggest sunflower they could find"),
)
TRIP_TROUBLES = lines("""
    On the way, {name} felt a little sick, so they stopped to rest under a tree.
    Halfway there, a tire went flat, and they had to wait for help. {name} counted the clouds while they waited.
    {name} left {his} hat on the seat, and they had to run back for it.
    A sudden shower made them all wet, but they laughed and dried off in the sun.
    {name} got tired of walking, so {his} {parent} carried {him} on {phis} shoulders.
    They took a wrong turn and got a little lost, but a kind stranger showed them the way.
""")

# birthday
CAKES = lines("""
    a chocolate cake with pink frosting
    a strawberry cake with white cream
    a lemon cake shaped like a star
    a carrot cake with little sugar carrots on top
    a vanilla cake covered in sprinkles
    a banana cake with honey on top
    a tall cake with three layers
    a round cake shaped like a soccer ball
    a blueberry cake with a candle for each year
    an orange cake with a sugar butterfly on top
    a coconut cake as white as snow
""")
PARTY_GAMES = words("""
    tag hopscotch charades
""") + lines("""
    musical chairs
    pin the tail on the donkey
    a treasure hunt
    a sack race
    freeze dance
    hide and seek
    duck, duck, goose
    a game of ring-around-the-rosy
    a balloon race
""")
AGES = words("four five six seven eight")

# new_friend
FAR_AWAY = lines("""
    a country far across the sea
    a big, noisy city
    a tiny island
    a farm in the hills
    a town in the north where it snowed all winter
    a village by a river
    a place where it was warm all year
    a house by the desert
""")

# apology
MISTAKES = (  # (what the hero did, how {he} made up for it)
    ("knocked over {friend}'s tall tower of blocks", "helped {fhim} build it again, even taller"),
    ("stepped on {friend}'s sand castle", "built a new castle with {fhim}, with a moat and a bridge"),
    ("laughed at {friend}'s drawing", "asked {friend} to teach {him} to draw"),
    ("ate the last cookie that was saved for {friend}", "baked new cookies with {his} {parent} and brought them over"),
    ("said that {friend} could not play in the game", "asked {friend} to be the captain of the next game"),
    ("spilled juice on {friend}'s new book", "dried the pages and drew a bright new cover for it"),
    ("tore {friend}'s kite by accident", "fixed the kite with tape and string"),
    ("pushed in front of {friend} in the line", "let {friend} go first all afternoon"),
    ("broke {friend}'s crayon and hid it", "gave {friend} {his} own best crayons"),
    ("called {friend} a slowpoke", "waited for {friend} at every corner on the way home"),
    ("forgot to come to {friend}'s puppet show", "asked {friend} to put on the show again, just for {him}"),
)

# build
BUILDS = (  # (what, the short name, made of, what went wrong, the better way)
    ("a sand castle", "the castle", "wet sand and little shells", "a big wave came and washed it away",
     "built it again, farther from the water, with a wall of stones to keep the waves out"),
    ("a fort", "the fort", "sticks, leaves and an old blanket", "the wind blew the blanket away",
     "tied the blanket down with string"),
    ("a bird feeder", "the bird feeder", "an old milk carton, string and seeds",
     "a greedy squirrel knocked it to the ground", "hung it from a thin branch the squirrel could not reach"),
    ("a birdhouse", "the birdhouse", "wood, glue and paint", "the roof kept falling off",
     "used more glue and held the roof until it dried"),
    ("a tower of blocks", "the tower", "all the wooden blocks in the house", "the tower wobbled and fell down",
     "built a wide, strong bottom first"),
    ("a toy boat", "the boat", "an empty box, a stick and a paper sail", "it got soggy and began to sink",
     "covered it with tape so the water could not get in"),
    ("a kite", "the kite", "paper, sticks and string", "it spun around and crashed",
     "gave it a long tail to keep it steady"),
    ("a robot", "the robot", "boxes, cans and bottle caps", "its arm kept falling off", "used strong tape and a bolt"),
    ("a little dam in the creek", "the dam", "stones, mud and sticks", "the water pushed through a hole",
     "filled the hole with more mud and small stones"),
    ("a cardboard rocket", "the rocket", "a big box, paper and paint", "the rain made it soft and floppy",
     "built a new one in the garage, where it was dry"),
    ("a tree house", "the tree house", "old boards, nails and a rope ladder", "one of the boards cracked",
     "found a thicker board and nailed it in tight"),
    ("a go-cart", "the go-cart", "an old crate and four wheels", "a wheel came off on the first ride",
     "fixed the wheel with a bigger bolt"),
    ("a scarecrow", "the scarecrow", "straw, old clothes and a hat", "the crows sat right on its head",
     "gave it a shiny ribbon that flapped in the wind"),
)

# garden
PLANTS = (  # (what is planted, what grows, what they did with it)
    ("sunflower seeds", "tall yellow sunflowers", "the birds came to eat the seeds"),
    ("carrot seeds", "long orange carrots", "they made a big pot of carrot soup"),
    ("tomato seeds", "fat red tomatoes", "they made a fresh salad for dinner"),
    ("pumpkin seeds", "big round pumpkins", "they carved funny faces in them"),
    ("strawberry plants", "sweet red strawberries", "they ate them with cream"),
    ("bean seeds", "long green beans that climbed up sticks", "they cooked them with butter"),
    ("pea seeds", "pods full of little green peas", "they ate the peas right out of the pods"),
    ("tulip bulbs", "bright red and yellow tulips", "they gave some to every neighbor on the street"),
    ("daisy seeds", "hundreds of white daisies", "they made daisy chains and wore them as crowns"),
    ("watermelon seeds", "huge striped watermelons", "they shared juicy slices with everyone"),
    ("potatoes", "lots of brown potatoes under the ground", "they baked them in the oven"),
    ("corn seeds", "tall stalks of sweet corn", "they ate the corn with butter and salt"),
    ("lavender seeds", "bushes of purple lavender", "the whole garden smelled sweet"),
    ("radish seeds", "little round red radishes", "they crunched them at lunch"),
    ("cucumber seeds", "cool green cucumbers", "they made pickles in a big glass jar"),
)
GARDEN_PESTS = lines("""
    One morning, a hungry rabbit nibbled some of the leaves, so they put up a little fence.
    Then it did not rain for many days, so {name} carried water in a heavy can every morning.
    Snails came at night to eat the leaves, so {name} moved them gently to the far end of the yard.
    A big storm bent the little plants, so {name} tied each one to a stick.
    Crows came to dig up the seeds, so {name} and {his} {parent} made a scarecrow.
""")

# lost_pet
ESCAPES = lines("""
    someone left the gate open, and {pet} slipped out
    {pet} chased a butterfly right over the fence
    {pet} ran out the door when the mail came
    a loud noise scared {pet}, and {pet_he} ran away
    {pet} squeezed through a hole in the hedge
""")
PET_FOUND = lines("""
    at the bakery, eating crumbs by the door
    in the neighbor's garden, asleep in a flower pot
    by the duck pond, playing with the ducks
    in the school yard, rolling in the grass
    up in a tree, too scared to come down
    in the library, curled up on a soft chair
    under a car, shaking and cold
    in the old barn, sleeping in the hay
""")

# race
RACES = lines("""
    a running race across the field
    a swimming race at the pool
    a bike race around the park
    a sack race at the school fair
    a race to the top of the hill
    a three-legged race
    an egg and spoon race
    a race with paper boats down the creek
    a skipping race on the beach
    a race around the pond
""")

# storm
STORM_SOUNDS = lines("""
    The wind howled around the house.
    Thunder boomed like a giant drum.
    Rain tapped and rattled on the roof.
    Lightning flashed and lit up the whole sky.
    The trees outside bent and creaked in the wind.
    The windows shook with every gust.
""")
STORM_GAMES = lines("""
    made shadow puppets on the wall with a flashlight
    told stories by candlelight
    sang songs to drown out the thunder
    counted the seconds between the lightning and the thunder
    played cards in a blanket fort
    ate crackers and cheese by the light of a candle
""")

# surprise
SURPRISES = (  # (the plan, doing it, the small disaster)
    ("make breakfast in bed", "made toast with jam and poured a glass of orange juice",
     "the toast got a little burnt"),
    ("clean the whole house", "swept the floor, dusted the shelves and made the beds",
     "{he} knocked over a bucket of water"),
    ("paint a big picture", "painted the whole family, with {pet} the {pet_kind} in the middle",
     "{he} got more paint on {himself} than on the paper"),
    ("plant flowers by the front door", "dug a little bed and planted bright red flowers",
     "{pet} the {pet_kind} dug up one of the flowers"),
    ("make a card and a paper crown", "cut out a crown and wrote a card covered in hearts",
     "the glue stuck {his} fingers together"),
    ("bake a batch of cookies", "mixed the dough and shaped it into little stars",
     "flour went all over the kitchen"),
    ("put on a little show", "practiced a song and made a stage out of a blanket",
     "the blanket fell down in the middle of the song"),
)

# quarrel
QUARRELS = (  # (what they argued about, what the hero wanted, what the friend wanted, how they both got it)
    ("which game to play", "play tag", "play hide and seek", "played tag first and hide and seek after"),
    ("whose turn it was on the swing", "swing first", "swing first", "counted to twenty and took turns"),
    ("where to build the fort", "build it under the tree", "build it by the fence",
     "built one big fort that went from the tree to the fence"),
    ("what color to paint the doghouse", "paint it blue", "paint it yellow", "painted it with blue and yellow stripes"),
    ("what to name the new puppy", "call it Spotty", "call it Bolt", "called the puppy Spotty Bolt"),
    ("who would be the captain of the pirate ship", "be the captain", "be the captain",
     "decided to each be captain for one day"),
    ("which story to read", "read the one about dragons", "read the one about the sea",
     "read both, one after the other"),
    ("what to build with the blocks", "build a castle", "build a train", "built a castle with a train going around it"),
)

# cooking
DISHES = (  # (what they made, its short name, what went into it, what went wrong)
    ("pancakes", "the pancakes", "flour, eggs and milk", "the first pancake flipped right onto the floor"),
    ("a big pot of vegetable soup", "the soup", "carrots, potatoes and peas", "{name} dropped in far too much salt"),
    ("a pizza", "the pizza", "dough, tomato sauce and lots of cheese", "the dough stuck to everything"),
    ("banana bread", "the bread", "ripe bananas, flour and a little honey", "an egg slipped and cracked on the floor"),
    ("a fruit salad", "the fruit salad", "apples, grapes, melon and berries", "{pet} the {pet_kind} stole a piece of melon"),
    ("a chocolate cake", "the cake", "flour, sugar, eggs and cocoa", "a cloud of flour went puff, right in {name}'s face"),
    ("cookies shaped like stars", "the cookies", "butter, sugar and flour", "the first tray came out a little too brown"),
    ("a picnic of sandwiches", "the sandwiches", "bread, cheese, cucumber and jam", "the jam squished out everywhere"),
    ("an apple pie", "the pie", "apples, cinnamon and a crust", "the crust tore in two places"),
    ("noodle soup", "the soup", "noodles, broth and green onions", "the noodles slid off the spoon and onto the table"),
    ("blueberry muffins", "the muffins", "blueberries, flour and butter", "the blueberries turned the batter purple"),
    ("tacos", "the tacos", "beans, rice, cheese and tomatoes", "the shells kept breaking"),
)

# bedtime
BEDTIME_WORRIES = lines("""
    the wind was making strange noises outside
    {he} kept thinking about the trip tomorrow
    the moon was shining right in {his} eyes
    a shadow on the wall looked like a monster
    {he} was not tired at all
    {he} missed {his} {obj}, which was lost somewhere in the house
    an owl kept hooting outside the window
""")
BEDTIME_TALES = lines("""
    a little star who was afraid to shine
    a sleepy bear who could not find a cave
    a boat that sailed all the way to the moon
    a mouse who wanted to touch the clouds
    a snail who raced the wind and won
    a tiny dragon who was scared of the dark
""")

# snow_day
WINTER_TIMES = ("One winter morning", "One cold morning", "Early one winter day", "On the first day of winter",
                "One frosty morning")
SNOW_GAMES = lines("""
    built a snowman with a carrot nose and a red scarf
    made snow angels in the soft white snow
    went sledding down the big hill
    had a snowball fight
    built a little snow house
    followed bird tracks across the yard
    caught snowflakes on their tongues
""")

# show
ACTS = (  # (what to do on stage, having done it)
    ("sing a song", "sang the song"), ("dance", "danced"), ("play the drums", "played the drums"),
    ("do a magic trick", "did the magic trick"), ("tell a funny joke", "told the joke"),
    ("read a poem", "read the poem"), ("play the violin", "played the violin"),
    ("play the recorder", "played the recorder"), ("juggle", "juggled"),
)
