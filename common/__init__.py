"""What the scripts share that is not their method; README "To copy a file" says which part a copy takes."""
