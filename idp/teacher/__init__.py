"""The teacher area (/teacher): a teacher's classes, their students' activation state,
one-time activation codes and printable sign-in cards."""
