"""Beyond one machine with Ray (the ``ray`` extra): distributed index builds and replicated serving."""
