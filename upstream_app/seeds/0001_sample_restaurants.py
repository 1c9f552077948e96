"""Sample restaurants with menus; idempotent (upserts by restaurant and item name)."""

from __future__ import annotations

from sqlalchemy import Connection, select

from upstream_app.db import menu_items, restaurants

meta = {"description": "eight sample restaurants in three cities, with menus", "safe": True}

# name, city, cuisine, is_featured
RESTAURANTS: list[tuple[str, str, str, bool]] = [
    ("Trattoria Roma", "Berlin", "italian", True),
    ("Sakura Sushi", "Berlin", "japanese", False),
    ("Curry House", "Berlin", "indian", False),
    ("Le Petit Bistro", "Paris", "french", True),
    ("Taqueria El Sol", "Paris", "mexican", False),
    ("Pho Saigon", "Paris", "vietnamese", False),
    ("Green Garden", "Lisbon", "vegetarian", True),
    ("Casa do Mar", "Lisbon", "portuguese", False),
]

# restaurant name -> [(item name, description, price in cents)]
MENUS: dict[str, list[tuple[str, str, int]]] = {
    "Trattoria Roma": [
        ("Margherita", "Tomato, mozzarella, basil", 950),
        ("Spaghetti Carbonara", "Guanciale, egg, pecorino", 1250),
        ("Tiramisu", "Mascarpone, espresso, cocoa", 650),
    ],
    "Sakura Sushi": [
        ("Salmon Nigiri", "Two pieces", 550),
        ("California Roll", "Crab, avocado, cucumber", 890),
        ("Miso Soup", "Tofu, wakame, spring onion", 390),
    ],
    "Curry House": [
        ("Chicken Tikka Masala", "With basmati rice", 1390),
        ("Palak Paneer", "Spinach and cottage cheese", 1190),
        ("Garlic Naan", "Baked in the tandoor", 350),
    ],
    "Le Petit Bistro": [
        ("Croque Monsieur", "Ham, gruyere, bechamel", 1100),
        ("Soupe a l'oignon", "Onion soup, croutons", 900),
        ("Creme Brulee", "Vanilla custard", 750),
    ],
    "Taqueria El Sol": [
        ("Tacos al Pastor", "Three tacos, pineapple", 1050),
        ("Guacamole", "With tortilla chips", 650),
    ],
    "Pho Saigon": [
        ("Pho Bo", "Beef noodle soup", 1250),
        ("Banh Mi", "Pork, pickled vegetables, coriander", 850),
    ],
    "Green Garden": [
        ("Buddha Bowl", "Quinoa, roasted vegetables, tahini", 1150),
        ("Lentil Soup", "Red lentils, cumin, lemon", 700),
    ],
    "Casa do Mar": [
        ("Bacalhau a Bras", "Salt cod, potatoes, egg", 1450),
        ("Pastel de Nata", "Custard tart", 180),
        ("Caldo Verde", "Kale and potato soup", 600),
    ],
}


def run(conn: Connection) -> None:
    """Insert or update every sample restaurant and its menu items."""
    for name, city, cuisine, featured in RESTAURANTS:
        values = {"name": name, "city": city, "cuisine": cuisine, "is_featured": featured}
        restaurant_id = conn.execute(
            select(restaurants.c.id).where(restaurants.c.name == name).order_by(restaurants.c.id)
        ).scalar()
        if restaurant_id is None:
            inserted = conn.execute(restaurants.insert().values(values))
            restaurant_id = inserted.inserted_primary_key[0]
        else:
            conn.execute(
                restaurants.update().where(restaurants.c.id == restaurant_id).values(values)
            )
        for item_name, description, price_cents in MENUS[name]:
            _upsert_menu_item(conn, restaurant_id, item_name, description, price_cents)


def _upsert_menu_item(
    conn: Connection, restaurant_id: int, name: str, description: str, price_cents: int
) -> None:
    values = {"description": description, "price_cents": price_cents}
    item_id = conn.execute(
        select(menu_items.c.id).where(
            menu_items.c.restaurant_id == restaurant_id, menu_items.c.name == name
        )
    ).scalar()
    if item_id is None:
        conn.execute(menu_items.insert().values(restaurant_id=restaurant_id, name=name, **values))
    else:
        conn.execute(menu_items.update().where(menu_items.c.id == item_id).values(values))
