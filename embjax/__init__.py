"""embjax: are the embedding spaces of different image models interchangeable?"""

__version__ = "0.1.0"
