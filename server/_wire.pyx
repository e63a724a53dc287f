# placeholder: the protobuf wire codec of the receipt messages is being written
