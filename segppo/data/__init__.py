"""Preference and prompt data: loading, layout detection, chat formatting and collation."""
