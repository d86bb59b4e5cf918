"""The school's working calendar: working days, support hours and deadlines."""
