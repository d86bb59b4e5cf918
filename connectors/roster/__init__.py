"""CSV roster import: ``parser`` reads the file, ``planner`` compares it with the
database (a dry run), ``applier`` makes the changes in one transaction. The parser and
the planner do not use Flask; the CLI (``darbaza roster import``) and the console page
(admin_ui/roster.py) call them."""
