def load_program(p): raise NotImplementedError
load_program_text = program_from_dict = load_program
